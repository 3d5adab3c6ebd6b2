"""The gradient probes under strategies they refuse, and under AMP where the gradients arrive still scaled."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

from lightning_probes import GradientDynamicsMonitor, GradientStatsMonitor
from lightning_probes.sharding import check_strategy
from tests.callbacks.test_gradient_dynamics import _reference
from tests.helpers import GradRecorder, RandomDataModule, approx, read, small_mlp, trainer


class DeepSpeedStrategy(SingleDeviceStrategy):
    """Stands in for Lightning's DeepSpeed strategy (not installed here): recognised by class name."""


class _NamedDeepSpeed(SingleDeviceStrategy):
    strategy_name = "deepspeed_stage_3"


def test_check_strategy_accepts_ddp_and_fsdp2():
    assert check_strategy("P", DDPStrategy()) is False
    assert check_strategy("P", SingleDeviceStrategy(device=torch.device("cpu"))) is False
    assert check_strategy("P", ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)) is True


@pytest.mark.parametrize("strategy, match", [
    (lambda: DeepSpeedStrategy(device=torch.device("cpu")), r"P does not support the DeepSpeed strategy.*\.grad"),
    (lambda: _NamedDeepSpeed(device=torch.device("cpu")), r"DeepSpeed strategy \(_NamedDeepSpeed\).*ddp"),
    (lambda: FSDPStrategy(), r"P does not support FSDPStrategy \(FSDP1.*fully_shard"),
    (lambda: ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
     r"tensor parallelism: ModelParallelStrategy has tensor_parallel_size=2.*tensor_parallel_size=1"),
])
def test_check_strategy_refuses(strategy, match):
    with pytest.raises(ValueError, match=match):
        check_strategy("P", strategy())


@pytest.mark.parametrize("probe", [GradientStatsMonitor, GradientDynamicsMonitor])
def test_deepspeed_stops_at_setup_before_training(tmp_path, probe):
    instance = probe(every_n_steps=1, output_dir=str(tmp_path))
    fit = trainer(tmp_path, [instance], strategy=DeepSpeedStrategy(device=torch.device("cpu")), accelerator="cpu")
    with pytest.raises(ValueError, match=f"{probe.__name__} does not support the DeepSpeed strategy"):
        fit.fit(small_mlp(), RandomDataModule())
    assert fit.global_step == 0


def test_histograms_are_refused_where_parameters_may_be_sharded(tmp_path, monkeypatch):
    fit = trainer(tmp_path, [])
    monkeypatch.setattr(type(fit), "strategy", property(
        lambda self: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)))
    probe = GradientStatsMonitor(histogram_every_n_steps=5, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"histograms under ModelParallelStrategy.*histogram_every_n_steps=None"):
        probe.setup(fit, small_mlp(), "fit")


class _FusedAdamMLP(type(small_mlp())):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=self.hparams_fused)


def _amp_run(tmp_path, fused: bool):
    pl.seed_everything(0)
    model = _FusedAdamMLP(hidden=(16, 12, 8), input_size=8)
    model.hparams_fused = fused
    recorder = GradRecorder()
    stats = GradientStatsMonitor(every_n_steps=1, output_dir=str(tmp_path))
    dynamics = GradientDynamicsMonitor(every_n_steps=1, zero_threshold=1e-4, release_threshold=1e-3,
                                       output_dir=str(tmp_path))
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    trainer(tmp_path, [recorder, stats, dynamics], plugins=[plugin], accelerator="cpu", max_steps=4).fit(
        model, RandomDataModule())
    return recorder, read(tmp_path / "gradient_stats.jsonl"), read(tmp_path / "gradient_dynamics.jsonl")


@pytest.mark.parametrize("fused", [True, False])
def test_amp_scaled_gradients_are_reported_unscaled(tmp_path, fused):
    """A fused Adam gets its gradients still multiplied by the loss scale (Lightning leaves the unscaling to the
    optimizer); a plain Adam gets them unscaled. The probes report the unscaled values either way."""
    recorder, stats, dynamics = _amp_run(tmp_path, fused)
    scale = 1024.0 if fused else 1.0  # what the gradients the recorder saw in the hook are multiplied by
    steps = recorder.by_step()
    assert sorted({r["step"] for r in stats}) == [0, 1, 2, 3]
    for r in stats:
        grads = steps[r["step"]]["grads"]
        g = (np.concatenate([v.numpy().ravel() for v in grads.values()]) if r["layer"] == "__total__"
             else grads[r["layer"]].numpy().ravel()) / scale
        assert r["grad_norm"] == pytest.approx(np.linalg.norm(g), rel=1e-5)
        assert r["grad_abs_max"] == pytest.approx(np.abs(g).max(), rel=1e-5)
        assert r["grad_abs_mean"] == pytest.approx(np.abs(g).mean(), rel=1e-5)
    unscaled = {}
    for s, step in steps.items():
        unscaled[s] = {**step, "grads": {k: v / scale for k, v in step["grads"].items()}}
    checked = 0
    for r in dynamics:
        if not r["has_previous"]:
            continue
        ref = _reference(unscaled[r["step"] - 1], unscaled[r["step"]], r["layer"], zero_thr=1e-4, rel_thr=1e-3)
        for key in ("zero_count", "minima_crossings", "maxima_crossings"):
            assert r[key] == ref[key], (r["step"], r["layer"], key)
        for key in ("grad_norm", "sign_flip_fraction", "released_fraction"):
            assert r[key] == approx(ref[key], rel=1e-5), (r["step"], r["layer"], key)
        checked += 1
    assert checked == 3 * 12  # three compared steps, 11 tensors and the total
    assert any(r["zero_count"] for r in dynamics)  # the thresholds matter: scaled gradients would count none


def test_compile_auto_rule(monkeypatch):
    """``compile="auto"`` (the default) compiles only when the fit will log at least COMPILE_MIN_LOGGED_STEPS
    steps and the platform can build kernels; the rule, not the timing, is tested."""
    from types import SimpleNamespace

    from lightning_probes.functional import _fused, _native

    cpu = torch.device("cpu")
    monkeypatch.setattr(_fused, "compile_supported", lambda device: True)
    monkeypatch.setattr(_native, "available", lambda: False)  # a CPU without the C loops: Inductor may pay
    bar = _fused.COMPILE_MIN_LOGGED_STEPS
    assert not _fused.should_compile(bar - 1, 1, cpu) and _fused.should_compile(bar, 1, cpu)
    assert not _fused.should_compile(50 * bar - 50, 50, cpu) and _fused.should_compile(50 * bar, 50, cpu)
    assert not _fused.should_compile(float("inf"), 1, cpu)  # a fit of unknown length stays eager
    for probe, kernels in ((GradientStatsMonitor(every_n_steps=2), "_kernel"),
                           (GradientDynamicsMonitor(every_n_steps=2), "_kernel_before")):
        assert probe.compile == "auto"
        probe._select(small_mlp())
        assert probe._decide_compile(SimpleNamespace(estimated_stepping_batches=2 * bar))
        assert getattr(probe, kernels).active
        assert not probe._decide_compile(SimpleNamespace(estimated_stepping_batches=2 * bar - 2))
        assert not getattr(probe, kernels).active
        probe.sharded = True  # FSDP2: the compiled kernels assume whole tensors
        assert not probe._decide_compile(SimpleNamespace(estimated_stepping_batches=10**9))
    monkeypatch.setattr(_native, "available", lambda: True)  # the C loops beat Inductor's code on a CPU
    assert not _fused.should_compile(10**9, 1, cpu) and _fused.should_compile(10**9, 1, torch.device("cuda"))
    monkeypatch.setattr(_fused, "compile_supported", lambda device: False)
    assert not _fused.should_compile(10**9, 1, cpu)
    with pytest.raises(ValueError, match="`compile` to be True, False or 'auto', but got 'yes'"):
        GradientStatsMonitor(compile="yes")


def test_short_fit_with_compile_auto_stays_eager(tmp_path):
    stats, dynamics = GradientStatsMonitor(every_n_steps=1), GradientDynamicsMonitor(every_n_steps=1)
    trainer(tmp_path, [stats, dynamics], max_steps=3).fit(small_mlp(), RandomDataModule())
    assert not stats._kernel.active and not dynamics._kernel_before.active
    assert stats.compile_seconds == dynamics.compile_seconds == 0.0
