"""`GradientNoiseScaleMonitor`: the recorded norms equal autograd's per-micro-batch gradients (accumulation, unequal
micro-batches, clipping), the EMAs a NumPy recursion; hooks only on measured steps; the training unchanged; resume
keeps the EMA state; DDP (with and without accumulation) equals one process; the pre-flight skips."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_probes as lp
from tests.helpers import read, run_in_new_session
from tests.noise_scale_dist_run import NoiseData, NoiseNet, tensors, union_indices

ROOT = Path(__file__).parents[2]


def fit(tmp_path, callbacks, data=None, model=None, **kwargs):
    settings = dict(max_epochs=1, default_root_dir=str(tmp_path), enable_progress_bar=False, logger=False,
                    enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    settings.update(kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **settings)
    model = model if model is not None else NoiseNet(lr=0.0)
    trainer.fit(model, data if data is not None else NoiseData())
    return trainer, model


def loader_of(n: int, batch_size: int = 4):
    x, y = tensors()
    return x[:n], y[:n], DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size, shuffle=False)


def micro_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> np.ndarray:
    """Autograd's mean gradient of each micro-batch (flattened over the parameters), on a copy of the model."""
    rows, start = [], 0
    for size in sizes:
        params = list(model.parameters())
        loss = nn.functional.mse_loss(model(x[start:start + size]), y[start:start + size])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double().numpy())
        start += size
    return np.stack(rows)


def test_records_equal_autograd_per_micro_batch(tmp_path):
    """lr = 0, accumulate 3 micro-batches of 4; 28 samples: steps of sizes (4,4,4), (4,4,4), (4) -- the last one
    rejected (one micro-batch) -- with gradient clipping, which acts after the probe reads ``.grad``."""
    x, y, data = loader_of(28)
    probe = lp.GradientNoiseScaleMonitor(every_n_steps=1, log_every_n_steps=1, ema_decay=0.5, output_dir=tmp_path)
    trainer = pl.Trainer(max_epochs=1, default_root_dir=str(tmp_path), enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, accumulate_grad_batches=3,
                         gradient_clip_val=1e-4, callbacks=[probe])
    model = NoiseNet(lr=0.0)
    trainer.fit(model, data)
    records = read(tmp_path / "gradient_noise_scale.jsonl")
    assert [(r["step"], r["measurements"], r["rejected"]) for r in records] == [(0, 1, 0), (1, 1, 0), (2, 0, 1)]
    ema, weight = np.zeros(2), 0.0
    for step, record in enumerate(records[:2]):
        grads = micro_gradients(model.net, x[12 * step:12 * step + 12], y[12 * step:12 * step + 12], [4, 4, 4])
        small = np.mean(np.sum(grads ** 2, axis=1))
        big = np.sum(grads.mean(axis=0) ** 2)
        grad_sq = (12 * big - 4 * small) / 8
        trace = (small - big) / (1 / 4 - 1 / 12)
        assert (record["b_small"], record["b_big"]) == (4.0, 12.0)
        assert record["small_sq"] == pytest.approx(small, rel=1e-5)
        assert record["big_sq"] == pytest.approx(big, rel=1e-5)  # not clipped (its norm is far above 1e-4)
        assert record["grad_sq"] == pytest.approx(grad_sq, rel=1e-4)
        assert record["trace_sigma"] == pytest.approx(trace, rel=1e-4)
        ema, weight = 0.5 * ema + 0.5 * np.array([grad_sq, trace]), 0.5 * weight + 0.5
        assert record["grad_sq_ema"] == pytest.approx(ema[0] / weight, rel=1e-4)
        assert record["trace_sigma_ema"] == pytest.approx(ema[1] / weight, rel=1e-4)
        assert record["b_simple_ema"] == pytest.approx(ema[1] / ema[0], rel=1e-4)
    assert records[2]["small_sq"] is None and records[2]["b_simple"] is None  # nothing usable
    assert records[2]["b_simple_ema"] == records[1]["b_simple_ema"]  # the rejected step left the EMAs alone
    assert trainer.callback_metrics["gradient_noise_scale/b_simple_ema"] == pytest.approx(records[1]["b_simple_ema"])


def test_unequal_micro_batches_and_the_end_of_epoch_rescaling(tmp_path):
    """Accumulate 3, 18 samples in batches of 4: steps (4, 4, 4) and (4, 2). The last step has m = 2 < K micro-batches
    (``.grad`` is (g1 + g2) / 3: rescaled by K / m) of unequal sizes (harmonic B_small = 8/3, B_big = 16/3)."""
    x, y, data = loader_of(18)
    probe = lp.GradientNoiseScaleMonitor(every_n_steps=1, log_every_n_steps=1, output_dir=tmp_path)
    _, model = fit(tmp_path, [probe], data, accumulate_grad_batches=3)
    record = read(tmp_path / "gradient_noise_scale.jsonl")[1]
    grads = micro_gradients(model.net, x[12:], y[12:], [4, 2])
    small, big = np.mean(np.sum(grads ** 2, axis=1)), np.sum(grads.mean(axis=0) ** 2)
    bs, bb = 2 / (1 / 4 + 1 / 2), 2 * 2 / (1 / 4 + 1 / 2)
    assert (record["b_small"], record["b_big"]) == pytest.approx((8 / 3, 16 / 3))
    assert record["small_sq"] == pytest.approx(small, rel=1e-5)
    assert record["big_sq"] == pytest.approx(big, rel=1e-5)
    assert record["grad_sq"] == pytest.approx((bb * big - bs * small) / (bb - bs), rel=1e-4)
    assert record["trace_sigma"] == pytest.approx((small - big) / (1 / bs - 1 / bb), rel=1e-4)


def test_hooks_only_on_measured_steps_and_the_training_unchanged(tmp_path):
    """every_n_steps=2: hooks on the micro-batches of steps 0, 2, 4, ... only, none left afterwards; the weights
    after training equal those of a run without the probe."""
    probe = lp.GradientNoiseScaleMonitor(every_n_steps=2, output_dir=tmp_path / "p")
    pl.seed_everything(0)
    trainer, model = fit(tmp_path / "p", [probe], accumulate_grad_batches=2, model=NoiseNet(lr=0.1), max_epochs=2)
    pl.seed_everything(0)
    _, plain = fit(tmp_path / "q", [], accumulate_grad_batches=2, model=NoiseNet(lr=0.1), max_epochs=2)
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    steps = trainer.global_step  # 64 samples, batches of 4, 2 micro-batches per step, 2 epochs: 16 steps
    assert steps == 16
    assert probe.hook_calls == 4 * 2 * (steps // 2)  # 4 parameter tensors x 2 micro-batches x measured steps
    assert all(not p._backward_hooks for p in model.parameters())
    records = read(tmp_path / "p" / "gradient_noise_scale.jsonl")
    # log_every_n_steps defaults to the Trainer's 50, rounded up to a multiple of 2; the rest at the end of training.
    assert [(r["step"], r["measurements"]) for r in records] == [(0, 1), (14, 7)]
    assert all(r["b_simple_ema"] is not None and r["rejected"] == 0 for r in records)


def test_resume_keeps_the_ema_state_and_writes_every_record_once(tmp_path):
    """3 epochs of 8 steps straight against 1 epoch, a checkpoint, and 2 more: the same records and values (the EMAs
    and the sums pending at the checkpoint come back from the state)."""
    def probe(out):
        return lp.GradientNoiseScaleMonitor(every_n_steps=1, log_every_n_steps=3, ema_decay=0.7, output_dir=out)

    pl.seed_everything(0)
    fit(tmp_path / "full", [probe(tmp_path / "full")], model=NoiseNet(lr=0.1), accumulate_grad_batches=2,
        max_epochs=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pl.seed_everything(0)
    fit(tmp_path / "first", [probe(tmp_path / "resumed"), checkpoint], model=NoiseNet(lr=0.1),
        accumulate_grad_batches=2, max_epochs=1, enable_checkpointing=True)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=3, default_root_dir=str(tmp_path), enable_progress_bar=False, logger=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accumulate_grad_batches=2,
                         callbacks=[probe(tmp_path / "resumed")])
    trainer.fit(NoiseNet(lr=0.1), NoiseData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    want = read(tmp_path / "full" / "gradient_noise_scale.jsonl")
    got = read(tmp_path / "resumed" / "gradient_noise_scale.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 3, 6, 9, 12, 15, 18, 21, 23]
    assert [r["measurements"] for r in got] == [r["measurements"] for r in want]
    for a, b in zip(want, got):
        for key in ("small_sq", "big_sq", "grad_sq", "trace_sigma", "grad_sq_ema", "trace_sigma_ema"):
            assert b[key] == pytest.approx(a[key], rel=1e-9), (a["step"], key)


def test_preflight_skips(tmp_path):
    with pytest.warns(lp.ProbeSkippedWarning, match="one process without gradient accumulation.*accumulate_grad"):
        fit(tmp_path / "a", [lp.GradientNoiseScaleMonitor(output_dir=tmp_path / "a")])
    assert read(tmp_path / "a" / "gradient_noise_scale.jsonl")[0]["probe_status"] == "skipped"

    class Manual(NoiseNet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            opt.step()

    with pytest.warns(lp.ProbeSkippedWarning, match="manual optimisation"):
        fit(tmp_path / "b", [lp.GradientNoiseScaleMonitor(output_dir=tmp_path / "b")], model=Manual(),
            accumulate_grad_batches=1)

    class Validated(NoiseNet):
        def validation_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)

    # validate only: idle, nothing written
    probe = lp.GradientNoiseScaleMonitor(output_dir=tmp_path / "c")
    data = DataLoader(TensorDataset(*tensors()), batch_size=4)
    pl.Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, logger=False, enable_model_summary=False,
               limit_val_batches=1, callbacks=[probe]).validate(Validated(), data)
    assert not (tmp_path / "c" / "gradient_noise_scale.jsonl").exists() or \
        not read(tmp_path / "c" / "gradient_noise_scale.jsonl")


@pytest.mark.parametrize("kwargs,match", [({"every_n_steps": 0}, "every_n_steps"),
                                          ({"every_n_steps": 4, "log_every_n_steps": 6}, "multiple of"),
                                          ({"ema_decay": 1.0}, "ema_decay"), ({"ema_decay": -0.1}, "ema_decay"),
                                          ({"batch_size": 0}, "batch_size")])
def test_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lp.GradientNoiseScaleMonitor(**kwargs)


def test_a_failing_hook_disables_the_probe_and_training_goes_on(tmp_path, monkeypatch):
    import lightning_probes.callbacks.gradient_noise_scale as module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(module.torch.linalg, "vector_norm", broken)
    probe = lp.GradientNoiseScaleMonitor(every_n_steps=1, log_every_n_steps=2, output_dir=tmp_path, on_error="warn")
    with pytest.warns(lp.ProbeDisabledWarning, match="boom"):
        trainer, model = fit(tmp_path, [probe], accumulate_grad_batches=2)
    assert trainer.global_step == 8 and probe.disabled
    assert all(not p._backward_hooks for p in model.parameters())


# -- DDP (and FSDP2's skip) -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("noise_scale_dist")
    run_in_new_session([sys.executable, str(ROOT / "tests" / "noise_scale_dist_run.py"), str(out)], 300,
                       "the DDP + FSDP2 noise-scale run")
    from tests.noise_scale_dist_run import fit as run_fit

    for sub, accumulate in (("ddp", 1), ("ddp_k2", 2)):
        run_fit(str(out / "single" / sub), "single", 2 * accumulate, 1, union_indices(2, accumulate))
    return out


@pytest.mark.parametrize("sub,b_big", [("ddp", 8.0), ("ddp_k2", 16.0)])
def test_ddp_equals_one_process_accumulating_the_same_micro_batches(distributed, sub, b_big):
    single = read(distributed / "single" / sub / "gradient_noise_scale.jsonl")
    multi = read(distributed / sub / "gradient_noise_scale.jsonl")
    assert [r["step"] for r in multi] == [r["step"] for r in single] and len(multi) >= 5
    for a, b in zip(single, multi):
        assert (b["b_small"], b["b_big"], b["world_size"]) == (4.0, b_big, 2)
        for key in ("small_sq", "big_sq", "grad_sq", "trace_sigma", "b_simple", "grad_sq_ema", "trace_sigma_ema",
                    "b_simple_ema", "measurements", "rejected"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (b["step"], key)
    assert not (distributed / sub / "skip_warnings.txt").read_text()


def test_fsdp2_is_skipped_with_one_warning(distributed):
    records = read(distributed / "fsdp2" / "gradient_noise_scale.jsonl")
    assert len(records) == 1 and records[0]["probe_status"] == "skipped" and "FSDP2" in records[0]["reason"]
    warned = (distributed / "fsdp2" / "skip_warnings.txt").read_text().splitlines()
    assert len(warned) == 1 and "FSDP2" in warned[0]
