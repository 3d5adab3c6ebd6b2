"""ConfidenceMonitor with many classes: the sparse confusion equals the dense one on every reported statistic."""

import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from sklearn.metrics import confusion_matrix
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_probes as lp
from lightning_probes.callbacks import confidence_state
from lightning_probes.callbacks.confidence_record import summarize
from lightning_probes.callbacks.confidence_state import ConfidenceState, dense_bytes
from lightning_probes.functional import merge_pairs, top_confusions
from tests.conftest import CaptureLogger
from tests.helpers import RandomDataModule, read, small_mlp, trainer

THRESHOLDS = (0.05, 0.2, 0.5)
#: What only a dense record holds.
DENSE_ONLY = {"confusion_matrix", "confidence_matrix", "confusion_format"}


def peaked_logits(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose argmax is often the target and otherwise one of a few 'confusable' classes (so that cells
    repeat), with spread-out confidences (so that every threshold level is reached)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    wrong = (target + torch.randint(1, 4, (n,), generator=g)) % classes
    pick = torch.where(torch.rand(n, generator=g) < 0.6, target, wrong)
    logits[torch.arange(n), pick] += 4 * torch.rand(n, generator=g) + 1
    return logits, target


def dense_top(matrix: np.ndarray, sums: np.ndarray, k: int) -> dict:
    """The k most frequent off-diagonal cells of a dense matrix: by count descending, then row-major."""
    c = len(matrix)
    cells = [(-int(matrix[t, p]), t * c + p) for t in range(c) for p in range(c) if t != p and matrix[t, p] > 0]
    cells.sort()
    listed = cells[:k]
    return {"true": [i // c for _, i in listed], "predicted": [i % c for _, i in listed],
            "count": [-m for m, _ in listed], "mean_confidence": [sums.flat[i] / -m for m, i in listed],
            "cells": len(cells), "other_count": sum(-m for m, _ in cells[k:])}


def assert_same_record(sparse: dict, dense: dict) -> None:
    """Every field of the sparse record equals the dense one exactly (floats included: the same sums)."""
    assert sparse["confusion_format"] == "sparse" and dense["confusion_format"] == "dense"
    assert set(dense) - set(sparse) == DENSE_ONLY - {"confusion_format"}
    for key, value in sparse.items():
        if key in ("confusion_format", "top_confusions", "thresholded"):
            continue
        assert value == dense[key], key
    for t, entry in dense["thresholded"].items():
        assert sparse["thresholded"][t] == {k: v for k, v in entry.items() if k != "confusion_matrix"}
    assert sparse["top_confusions"]["true"] == dense["top_confusions"]["true"]
    assert sparse["top_confusions"]["count"] == dense["top_confusions"]["count"]
    np.testing.assert_allclose(sparse["top_confusions"]["mean_confidence"], dense["top_confusions"]["mean_confidence"],
                               rtol=1e-12)


@pytest.mark.parametrize("merge_at", [8, 65_536])
def test_sparse_state_equals_the_dense_state_and_sklearn(monkeypatch, merge_at):
    monkeypatch.setattr(confidence_state, "MERGE_AT", merge_at)  # 8: rows merged after almost every batch
    classes = 300
    dense = ConfidenceState(classes, 15, THRESHOLDS, 200, ignore_index=-100)
    sparse = ConfidenceState(classes, 15, THRESHOLDS, 200, ignore_index=-100, sparse=True)
    all_logits, all_targets = [], []
    for seed in range(6):
        logits, target = peaked_logits(700, classes, seed)
        target[::17] = -100  # left out
        for state in (dense, sparse):
            state.update(logits, target)
        all_logits.append(logits)
        all_targets.append(target)
    assert sparse.pair_rows() < 6 * 700 or merge_at > 6 * 700
    a, b = summarize(dense.compute(), THRESHOLDS, 50), summarize(sparse.compute(), THRESHOLDS, 50)
    assert_same_record(b, a)
    # Independent references: sklearn's confusion matrix and a NumPy ranking of its off-diagonal cells.
    logits, target = torch.cat(all_logits), torch.cat(all_targets)
    keep = target != -100
    probs = logits[keep].softmax(1)
    pred, conf, y = probs.argmax(1).numpy(), probs.max(1).values.double().numpy(), target[keep].numpy()
    reference = confusion_matrix(y, pred, labels=range(classes))
    assert a["confusion_matrix"] == reference.tolist()
    sums = np.zeros((classes, classes))
    np.add.at(sums, (y, pred), conf)
    want = dense_top(reference, sums, 50)
    got = b["top_confusions"]
    assert {k: got[k] for k in ("true", "predicted", "count", "cells", "other_count")} == \
        {k: want[k] for k in ("true", "predicted", "count", "cells", "other_count")}
    np.testing.assert_allclose(got["mean_confidence"], want["mean_confidence"], rtol=1e-6)
    assert b["n"] == int(keep.sum())
    assert b["accuracy"] == pytest.approx((pred == y).mean(), abs=1e-12)
    assert b["per_class_recall"] == pytest.approx(
        list(np.divide(np.diag(reference), reference.sum(1), out=np.zeros(classes), where=reference.sum(1) > 0)))
    for t in THRESHOLDS:
        reached = conf >= np.float32(t)
        assert b["thresholded"][str(t)]["coverage"] == pytest.approx(reached.mean(), abs=1e-12)
        assert b["thresholded"][str(t)]["accuracy"] == pytest.approx((pred == y)[reached].mean(), abs=1e-12)


def test_merge_pairs_and_top_confusions_against_numpy():
    g = torch.Generator().manual_seed(3)
    cells = torch.randint(0, 36, (500,), generator=g).double()
    conf = torch.rand(500, generator=g, dtype=torch.float64)
    merged = merge_pairs(torch.stack([cells, torch.ones(500, dtype=torch.float64), conf], dim=1))
    counts, sums = np.zeros(36), np.zeros(36)
    np.add.at(counts, cells.long().numpy(), 1)
    np.add.at(sums, cells.long().numpy(), conf.numpy())
    assert merged[:, 0].long().tolist() == np.flatnonzero(counts).tolist()
    assert merged[:, 1].tolist() == counts[counts > 0].tolist()
    np.testing.assert_allclose(merged[:, 2].numpy(), sums[counts > 0], rtol=1e-12)
    got = top_confusions(merged, 6, 7)
    want = dense_top(counts.reshape(6, 6), sums.reshape(6, 6), 7)
    assert {k: v for k, v in got.items() if k != "mean_confidence"} == \
        {k: v for k, v in want.items() if k != "mean_confidence"}
    np.testing.assert_allclose(got["mean_confidence"], want["mean_confidence"], rtol=1e-12)
    with pytest.raises(ValueError, match="rows"):
        merge_pairs(torch.zeros(4))


# -- a language-model-like run: logits (N, V, T) against tokens (N, T) -------------------------------------
VOCAB, LENGTH = 500, 6


class TokenLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids)).transpose(1, 2)  # (N, V, T), as cross_entropy takes it

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return {"logits": self(batch[0]), "target": batch[1]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def token_loader(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB // 5, (n, LENGTH + 1), generator=g)  # few tokens: cells repeat
    return DataLoader(TensorDataset(ids[:, :-1], (ids[:, 1:] * 7) % VOCAB), batch_size=8)


def test_a_language_model_gets_the_sparse_confusion_within_its_share(tmp_path):
    logger = CaptureLogger()
    auto = lp.ConfidenceMonitor(output_dir=str(tmp_path), max_memory_gb=0.01)  # 10 MB: sparse at 500 classes
    dense = lp.ConfidenceMonitor(output_dir=str(tmp_path), name="dense", confusion="dense")
    fit = trainer(tmp_path, [auto, dense], logger=logger, max_epochs=1, num_sanity_val_steps=1)
    fit.fit(TokenLM(), token_loader(64, 0), token_loader(48, 1))
    assert dense_bytes(VOCAB, 3) > 0.01e9
    plan = lp.memory_plan(fit)
    assert plan["confidence"]["reduced"].startswith("sparse confusion of the 500 classes")
    assert plan["confidence"]["planned"] <= plan["confidence"]["share"] == int(0.01e9)
    assert plan["dense"]["reduced"] is None and plan["dense"]["planned"] == dense_bytes(VOCAB, 3)
    sparse_record, dense_record = read(tmp_path / "confidence.jsonl")[-1], read(tmp_path / "dense.jsonl")[-1]
    assert sparse_record["n"] == 48 * LENGTH
    assert_same_record({k: v for k, v in sparse_record.items() if k != "step"},
                       {k: v for k, v in dense_record.items() if k != "step"})
    assert (tmp_path / "confidence" / "val_top_confusions.png").stat().st_size > 1000
    assert not (tmp_path / "confidence" / "val_confusion.png").exists()
    assert "confidence/val/top_confusions" in logger.figures
    assert "confidence/val/heatmap/confusion" not in logger.figures


def test_auto_is_dense_when_the_matrices_fit_the_share_and_sparse_otherwise(tmp_path):
    probe = lp.ConfidenceMonitor(output_dir=str(tmp_path))
    fit = trainer(tmp_path, [probe], max_epochs=1)
    fit.fit(TokenLM(), token_loader(16, 0), token_loader(16, 1))
    record = read(tmp_path / "confidence.jsonl")[-1]
    # 500 classes: 500^2 * 416 bytes = 104 MB > the 64 MiB floor of a tiny model's budget: sparse.
    assert record["confusion_format"] == "sparse"
    small = lp.ConfidenceMonitor(output_dir=str(tmp_path / "small"))
    trainer(tmp_path, [small], max_epochs=1).fit(small_mlp(), RandomDataModule())
    assert read(tmp_path / "small" / "confidence.jsonl")[-1]["confusion_format"] == "dense"


@pytest.mark.parametrize(("kwargs", "match"), [({"confusion": "csr"}, "`confusion`"),
                                               ({"top_confusions": 0}, "`top_confusions`"),
                                               ({"max_memory_gb": -1}, "`max_memory_gb`"),
                                               ({"max_memory_gb": True}, "`max_memory_gb`")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lp.ConfidenceMonitor(**kwargs)


# -- DDP: each rank's rows gathered and merged ------------------------------------------------------------
def _rank(rank: int, path: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        state = ConfidenceState(120, 10, THRESHOLDS, 100, sparse=True)
        if rank == 0:  # rank 1 sees no batch at all: its empty rows must still fit the gather
            for seed in range(3):
                state.update(*peaked_logits(200, 120, seed))
        computed = state.compute()
        if rank == 0:
            torch.save(computed, out)
    finally:
        torch.distributed.destroy_process_group()


def _rank_both(rank: int, path: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        state = ConfidenceState(120, 10, THRESHOLDS, 100, sparse=True)
        for seed in range(rank, 6, 2):
            state.update(*peaked_logits(200, 120, seed))
        computed = state.compute()
        if rank == 0:
            torch.save(computed, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("worker", [_rank_both, _rank], ids=["both_ranks", "one_rank_empty"])
def test_sparse_state_is_gathered_across_processes(tmp_path, worker):
    out = str(tmp_path / "computed.pt")
    mp.spawn(worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    gathered = torch.load(out)
    single = ConfidenceState(120, 10, THRESHOLDS, 100)  # dense, one process, the same batches
    for seed in (range(6) if worker is _rank_both else range(3)):
        single.update(*peaked_logits(200, 120, seed))
    assert_same_record(summarize(gathered, THRESHOLDS), summarize(single.compute(), THRESHOLDS))
    assert os.path.exists(out)
