"""`AttentionMonitor` in training: records against a plain softmax of the captured inputs, the model untouched,
nothing hooked on steps that are not due, the SDPA path, the pre-flight, resume, and DDP/FSDP2."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.functional import scaled_dot_product_attention as imported_sdpa
from torch.utils.data import DataLoader, TensorDataset

from lightning_probes import AttentionMonitor
from lightning_probes.callbacks.guard import ProbeSkippedWarning
from lightning_probes.errors import ProbeConfigurationError
from tests.conftest import CaptureLogger
from tests.functional.test_attention import reference
from tests.helpers import RandomDataModule, read, run_in_new_session, small_mlp, trainer

ROOT = Path(__file__).parents[2]
VOCAB, LENGTH = 12, 6


def token_data(n: int = 48, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    lengths = torch.randint(3, LENGTH + 1, (n,), generator=g)
    ids[torch.arange(LENGTH) >= lengths[:, None]] = 0  # right padding with token 0
    return DataLoader(TensorDataset(ids, ids[:, 1] % 3), batch_size=batch_size)


class MHANet(pl.LightningModule):
    """Embedding, one ``nn.MultiheadAttention`` (causal, key padding) and a sequence-first encoder layer."""

    def __init__(self, batch_first: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, 8)
        self.attn = nn.MultiheadAttention(8, 2, dropout=dropout, batch_first=batch_first)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) * 3
        pad = ids == 0
        causal = torch.triu(torch.ones(LENGTH, LENGTH, dtype=torch.bool), 1)
        x = h if self.batch_first else h.transpose(0, 1)
        a, _ = self.attn(x, x, x, key_padding_mask=pad, attn_mask=causal)
        y = self.encoder(x + a, src_key_padding_mask=pad)
        y = y if self.batch_first else y.transpose(0, 1)
        return self.head(y.mean(1))

    def training_step(self, batch, batch_idx):
        ids, target = batch
        return F.cross_entropy(self(ids), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Capture(pl.Callback):
    """Independent reference: every call's inputs (and the module weights) of the named MHAs, per step."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.calls = names, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.handles = []
        for name in self.names:
            module = pl_module.get_submodule(name)

            def hook(mod, args, kwargs, name=name, step=trainer.global_step):
                full = dict(zip(("query", "key", "value"), args), **kwargs)
                w = mod.in_proj_weight.detach().double().clone()
                b = mod.in_proj_bias.detach().double().clone()
                self.calls.setdefault((step, name), []).append((
                    {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in full.items()}, w, b,
                    mod.batch_first, mod.num_heads))
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for handle in self.handles:
            handle.remove()


def mha_call_reference(calls) -> dict[str, np.ndarray]:
    """NumPy statistics of every query row of the captured calls of one layer and step."""
    qs, ks, visible, biases = [], [], [], []
    for a, w, b, batch_first, heads in calls:
        x, y = a["query"].double().numpy(), a["key"].double().numpy()
        if not batch_first:
            x, y = x.transpose(1, 0, 2), y.transpose(1, 0, 2)
        e = w.shape[1]
        q = (x @ w[:e].numpy().T + b[:e].numpy())
        k = (y @ w[e:2 * e].numpy().T + b[e:2 * e].numpy())
        n, length, s = q.shape[0], q.shape[1], k.shape[1]
        q = q.reshape(n, length, heads, e // heads).transpose(0, 2, 1, 3)
        k = k.reshape(n, s, heads, e // heads).transpose(0, 2, 1, 3)
        vis = np.ones((n, heads, length, s), dtype=bool)
        bias = np.zeros(vis.shape)
        mask = a.get("attn_mask")
        if mask is not None:
            mask = mask.numpy()
            vis &= ~mask if mask.dtype == bool else mask > -1e4
            if mask.dtype != bool:
                bias = bias + np.where(mask > -1e4, mask, 0.0)
        pad = a.get("key_padding_mask")
        if pad is not None:
            pad = pad.numpy()
            vis &= ~pad[:, None, None, :] if pad.dtype == bool else (pad > -1e4)[:, None, None, :]
        qs.append(q), ks.append(k), visible.append(vis), biases.append(bias)
    return reference(np.concatenate(qs), np.concatenate(ks), np.concatenate(visible), np.concatenate(biases))


def _compare(record: dict, ref: dict[str, np.ndarray], rel: float = 2e-5) -> None:
    for stat in ("entropy_mean", "entropy_min", "entropy_norm_mean", "max_logit", "sink_mass"):
        got = np.array([np.nan if v is None else v for v in record["per_head"][stat]])
        np.testing.assert_allclose(got, ref[stat], rtol=rel, atol=1e-6, err_msg=stat)
    assert record["queries"] == int(ref["queries"].max())
    assert record["max_logit"] == pytest.approx(np.nanmax(ref["max_logit"]), rel=rel)
    assert record["entropy_min"] == pytest.approx(np.nanmin(ref["entropy_min"]), rel=rel, abs=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_records_equal_a_plain_softmax_of_the_captured_inputs(tmp_path, batch_first):
    names = ["attn", "encoder.self_attn"]
    capture = Capture(names)
    logger = CaptureLogger()
    probe = AttentionMonitor(every_n_steps=2, max_queries=None, output_dir=str(tmp_path / "out"))
    trainer(tmp_path, [capture, probe], logger=logger, max_epochs=1, log_every_n_steps=1).fit(
        MHANet(batch_first), token_data())
    records = read(tmp_path / "out" / "attention.jsonl")
    assert [(r["step"], r["layer"]) for r in records] == [(s, n) for s in (0, 2, 4) for n in names]
    for record in records:
        assert record["kind"] == "mha" and record["heads"] == 2
        _compare(record, mha_call_reference(capture.calls[(record["step"], record["layer"])]))
    assert "attention/max_logit/attn" in logger.keys()
    assert "attention/entropy_norm_mean/encoder.self_attn" in logger.keys()


def test_sampled_queries_are_a_subset_and_reproducible(tmp_path):
    runs = []
    for i in range(2):
        probe = AttentionMonitor(every_n_steps=3, max_queries=5, seed=3, output_dir=str(tmp_path / f"o{i}"))
        pl.seed_everything(0)
        trainer(tmp_path, [probe], max_epochs=1).fit(MHANet(), token_data())
        runs.append(read(tmp_path / f"o{i}" / "attention.jsonl"))
    assert runs[0] == runs[1]
    assert all(r["queries"] == 5 for r in runs[0])


def test_the_probe_changes_nothing_in_training_bit_exact(tmp_path):
    """Dropout in the attention (so the random state matters) and need_weights as the model passes it."""
    weights = []
    for with_probe in (False, True):
        pl.seed_everything(0)
        model = MHANet(dropout=0.2)
        callbacks = [AttentionMonitor(every_n_steps=1, max_queries=4, output_dir=str(tmp_path / "o"))] \
            if with_probe else []
        trainer(tmp_path, callbacks, max_epochs=1).fit(model, token_data())
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    # The module's own output, called directly while armed (need_weights=True returns the same weights).
    model = MHANet()
    x = model.embed(torch.randint(1, VOCAB, (2, LENGTH)))
    before = model.attn(x, x, x)
    probe = AttentionMonitor(max_queries=3)
    probe._layers = [probe._layer("attn", model.attn)]
    probe._arm(0)
    probe._recording = True
    after = model.attn(x, x, x)
    assert model.attn._forward_pre_hooks and probe._layers[0].acc is not None
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    probe._remove_hooks()
    assert not model.attn._forward_pre_hooks


class HookCounter(pl.Callback):
    """After the probe's hook: the hooks on the attention module at every batch, and its forward calls."""

    def __init__(self) -> None:
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, len(pl_module.attn._forward_pre_hooks)))


def test_nothing_is_hooked_or_computed_on_steps_that_are_not_due(tmp_path, monkeypatch):
    import lightning_probes.callbacks.attention as module

    calls = []
    real = module.mha_row_summary
    monkeypatch.setattr(module, "mha_row_summary", lambda *a, **k: calls.append(1) or real(*a, **k))
    counter = HookCounter()
    probe = AttentionMonitor(every_n_steps=4, output_dir=str(tmp_path / "o"))
    trainer(tmp_path, [probe, counter], max_epochs=2).fit(MHANet(), token_data())
    assert counter.seen == [(s, 1 if s % 4 == 0 else 0) for s in range(12)]
    assert len(calls) == 3 * 2  # steps 0, 4, 8; two attention modules
    assert not any(m._forward_pre_hooks for m in (probe._layers[0].module, probe._layers[1].module))


def test_gradient_accumulation_observes_every_micro_batch_of_the_due_step(tmp_path):
    names = ["attn"]
    capture = Capture(names)
    probe = AttentionMonitor(every_n_steps=2, max_queries=None, layers=names, output_dir=str(tmp_path / "o"))
    trainer(tmp_path, [capture, probe], max_epochs=1, accumulate_grad_batches=2).fit(MHANet(), token_data())
    records = read(tmp_path / "o" / "attention.jsonl")
    assert [r["step"] for r in records] == [0, 2]
    for record in records:
        calls = capture.calls[(record["step"], "attn")]
        assert len(calls) == 2
        _compare(record, mha_call_reference(calls))


class SdpaBlock(nn.Module):
    """Self-attention written with SDPA (grouped-query: 4 query heads, 2 key heads), called by its imported name."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.kv = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)
        self.seen = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q = self.q(x).view(n, length, 4, 2).transpose(1, 2)
        k, v = self.kv(x).view(n, length, 2, 2, 2).permute(2, 0, 3, 1, 4)
        self.seen.append((q.detach().clone(), k.detach().clone()))
        y = imported_sdpa(q, k, v, is_causal=True, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(n, length, 8))


class SdpaNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.block = SdpaBlock()
        self.head = nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        ids, target = batch
        return F.cross_entropy(self.head(self.block(self.embed(ids) * 3).mean(1)), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_sdpa_calls_are_observed_in_the_named_module(tmp_path):
    model = SdpaNet()
    steps = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.append(trainer.global_step)

    probe = AttentionMonitor(every_n_steps=2, max_queries=None, sdpa_modules=r"^block$",
                             output_dir=str(tmp_path / "o"))
    trainer(tmp_path, [probe, Steps()], max_epochs=1).fit(model, token_data())
    records = read(tmp_path / "o" / "attention.jsonl")
    assert [(r["step"], r["layer"], r["kind"], r["heads"]) for r in records] == \
        [(s, "block", "sdpa", 4) for s in (0, 2, 4)]
    for record in records:
        q, k = model.block.seen[steps.index(record["step"])]
        k = k.repeat_interleave(2, dim=1)
        visible = np.broadcast_to(np.tril(np.ones((LENGTH, LENGTH), dtype=bool)), (q.shape[0], 4, LENGTH, LENGTH))
        _compare(record, reference(q.double().numpy(), k.double().numpy(), visible))


def test_no_attention_skips_with_one_warning(tmp_path):
    probe = AttentionMonitor(output_dir=str(tmp_path / "o"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [probe], max_epochs=1).fit(small_mlp(), RandomDataModule())
    skips = [w for w in caught if issubclass(w.category, ProbeSkippedWarning)]
    assert len(skips) == 1 and "no nn.MultiheadAttention" in str(skips[0].message)
    assert [r["probe_status"] for r in read(tmp_path / "o" / "attention.jsonl")] == ["skipped"]


@pytest.mark.parametrize("kwargs, match", [
    ({"layers": ["attn", "atn.x"]}, r"\['atn.x'\].*attn"),
    ({"sdpa_modules": "nothing_like_this"}, "matches no module"),
    ({"sdpa_modules": ["^block$", "^block.q$"]}, "inside one another"),
])
def test_named_layers_that_cannot_be_observed_are_refused(tmp_path, kwargs, match):
    model = SdpaNet() if "sdpa_modules" in kwargs else MHANet()
    with pytest.raises(ProbeConfigurationError, match=match):
        trainer(tmp_path, [AttentionMonitor(**kwargs)], max_epochs=1).fit(model, token_data())


@pytest.mark.parametrize("kwargs", [{"every_n_steps": 0}, {"max_queries": 0}, {"layers": "attn"},
                                    {"workspace_mb": 0}, {"seed": 1.5}, {"sdpa_modules": "("}])
def test_bad_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AttentionMonitor(**kwargs)


def test_a_failure_inside_the_hook_never_reaches_the_forward(tmp_path, monkeypatch):
    import lightning_probes.callbacks.attention as module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(module, "mha_row_summary", broken)
    probe = AttentionMonitor(every_n_steps=2, on_error="warn", output_dir=str(tmp_path / "o"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = trainer(tmp_path, [probe], max_epochs=1)
        fit.fit(MHANet(), token_data())
    assert fit.global_step == 6  # training went on
    assert probe.disabled and "boom" in probe.disabled
    assert any("boom" in str(w.message) for w in caught)
    assert not probe._handles


def test_resume_writes_every_step_once(tmp_path):
    kwargs = dict(every_n_steps=2, max_queries=None)
    straight = AttentionMonitor(**kwargs, output_dir=str(tmp_path / "straight"))
    pl.seed_everything(0)
    trainer(tmp_path, [straight], max_epochs=2).fit(MHANet(), token_data())
    first = AttentionMonitor(**kwargs, output_dir=str(tmp_path / "resumed"))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    pl.seed_everything(0)
    trainer(tmp_path, [first, ckpt], max_epochs=1, enable_checkpointing=True).fit(MHANet(), token_data())
    second = AttentionMonitor(**kwargs, output_dir=str(tmp_path / "resumed"))
    trainer(tmp_path, [second], max_epochs=2, enable_checkpointing=True).fit(
        MHANet(), token_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    a, b = read(tmp_path / "straight" / "attention.jsonl"), read(tmp_path / "resumed" / "attention.jsonl")
    assert [(r["step"], r["layer"]) for r in a] == [(r["step"], r["layer"]) for r in b]
    assert [(s, n) for s, n in {(r["step"], r["layer"]) for r in b}] and len(b) == 2 * 6
    for x, y in zip(a, b):
        assert x["max_logit"] == pytest.approx(y["max_logit"], rel=1e-5)


def test_ddp_and_fsdp2_give_the_single_process_numbers_on_the_union_of_the_batches(tmp_path):
    """One script, 2 processes (gloo): a DDP fit and an FSDP2 fit; here the same model on one process."""
    from tests.attention_dist_run import make_model, probe, reference_data

    out = tmp_path / "dist"
    run_in_new_session([sys.executable, str(ROOT / "tests" / "attention_dist_run.py"), str(out)], 400,
                       "the attention DDP/FSDP2 run")
    trainer(tmp_path, [probe(str(tmp_path / "single"))], max_epochs=1).fit(make_model(shard=False),
                                                                          reference_data(batch_size=16, union=True))
    single = read(tmp_path / "single" / "attention.jsonl")
    assert [(r["step"], r["layer"]) for r in single] == [(s, n) for s in (0, 2) for n in ("attn", "block")]
    for kind in ("ddp", "fsdp2"):
        records = read(out / kind / "attention.jsonl")
        assert [(r["step"], r["layer"]) for r in records] == [(r["step"], r["layer"]) for r in single], kind
        for a, b in zip(records, single):
            assert a["queries"] == b["queries"] == 16 * 5
            for stat in ("entropy_mean", "entropy_min", "entropy_norm_mean", "max_logit", "sink_mass"):
                assert a["per_head"][stat] == pytest.approx(b["per_head"][stat], rel=1e-4, abs=1e-6), (kind, stat)
                assert a[stat] == pytest.approx(b[stat], rel=1e-4, abs=1e-6), (kind, stat)
    assert math.isfinite(single[0]["max_logit"])
