"""The gradient probes over a run's life: parameters that exist only after ``setup`` (``configure_model``, lazy
modules), an empty selection refused before step 0, the same instances in a second ``fit``, and failures in
the optimiser post-step hooks (outside Lightning's hook dispatch)."""

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_probes import GradientDynamicsMonitor, GradientStatsMonitor
from lightning_probes.callbacks.guard import ProbeDisabledWarning, ProbeSkippedWarning
from lightning_probes.errors import ProbeConfigurationError
from tests.helpers import GradRecorder, RandomDataModule, read, trainer

PROBES = [GradientStatsMonitor, GradientDynamicsMonitor]


class Net(pl.LightningModule):
    """Cross-entropy on ``self.net`` (inputs ``(N, 1, 8, 8)``, 10 classes), SGD."""

    def __init__(self, net=None, lr=0.1):
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class LateBuilt(Net):
    """No layer until ``configure_model``."""

    def configure_model(self):
        if self.net is None:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def lazy_net():
    return Net(nn.Sequential(nn.Flatten(), nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 10)))


def _grad_stats_match(records, recorder):
    """Every record's norm, mean |g| and max |g| against the recorder's gradients (NumPy)."""
    steps = recorder.by_step()
    for r in records:
        grads = steps[r["step"]]["grads"]
        layers = grads.values() if r["layer"] == "__total__" else [grads[r["layer"]]]
        a = np.abs(np.concatenate([g.numpy().ravel() for g in layers]))
        assert r["grad_norm"] == pytest.approx(np.linalg.norm(a), rel=1e-5)
        assert r["grad_abs_mean"] == pytest.approx(a.mean(), rel=1e-5)
        assert r["grad_abs_max"] == pytest.approx(a.max(), rel=1e-5)
    return len(records)


def _dynamics_norms_match(records, recorder):
    """grad, weight (after the step) and update norms against the recorder's copies (NumPy)."""
    steps = recorder.by_step()
    for r in records:
        s = steps[r["step"]]
        names = list(s["grads"]) if r["layer"] == "__total__" else [r["layer"]]

        def norm(values):
            return np.linalg.norm(np.concatenate([v.numpy().ravel() for v in values]))
        assert r["grad_norm"] == pytest.approx(norm(s["grads"][n] for n in names), rel=1e-5)
        assert r["weight_norm"] == pytest.approx(norm(s["after"][n] for n in names), rel=1e-5)
        assert r["update_norm"] == pytest.approx(norm(s["after"][n] - s["before"][n] for n in names), rel=1e-4)
    return len(records)


def _fit(tmp_path, model, probes, **kwargs):
    recorder = GradRecorder()
    trainer(tmp_path, [recorder, *probes], **kwargs).fit(model, RandomDataModule())
    return recorder


# -- parameters that exist only after `setup` ------------------------------------------------------
def test_layers_built_in_configure_model_are_read(tmp_path):
    stats = GradientStatsMonitor(every_n_steps=2, output_dir=str(tmp_path))
    dynamics = GradientDynamicsMonitor(every_n_steps=2, output_dir=str(tmp_path))
    recorder = _fit(tmp_path, LateBuilt(), [stats, dynamics], max_epochs=1)
    layers = {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias", "__total__"}
    for name, check in (("gradient_stats", _grad_stats_match), ("gradient_dynamics", _dynamics_norms_match)):
        records = read(tmp_path / f"{name}.jsonl")
        assert sorted({r["step"] for r in records}) == [0, 2, 4]
        assert {r["layer"] for r in records} == layers
        assert check(records, recorder) == 3 * len(layers)


def test_lazy_modules_are_read_from_step_zero(tmp_path):
    stats = GradientStatsMonitor(every_n_steps=2, output_dir=str(tmp_path))
    dynamics = GradientDynamicsMonitor(every_n_steps=2, output_dir=str(tmp_path))
    recorder = _fit(tmp_path, lazy_net(), [stats, dynamics], max_epochs=1)
    layers = {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias", "__total__"}
    for name, check in (("gradient_stats", _grad_stats_match), ("gradient_dynamics", _dynamics_norms_match)):
        records = read(tmp_path / f"{name}.jsonl")
        assert sorted({r["step"] for r in records}) == [0, 2, 4]  # step 0 is logged
        assert {r["layer"] for r in records} == layers
        assert check(records, recorder) == 3 * len(layers)
    assert stats._params[0].shape == (16, 64)


def test_a_lazy_module_that_never_runs_is_left_out_untouched(tmp_path):
    model = lazy_net()
    model.unused = nn.LazyLinear(3)  # never called: its parameters never get a shape
    probes = [cls(every_n_steps=1, output_dir=str(tmp_path)) for cls in PROBES]
    trainer(tmp_path, probes, max_steps=2).fit(model, RandomDataModule())
    for probe in probes:
        records = read(probe.jsonl_path)
        assert sorted({r["step"] for r in records}) == [0, 1]
        assert not any(r["layer"].startswith("unused") for r in records)


class _CountBatches(pl.Callback):
    batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1


@pytest.mark.parametrize("probe_cls", PROBES)
@pytest.mark.parametrize("model", [LateBuilt, lazy_net])
def test_a_selection_matching_nothing_is_refused_before_step_zero(tmp_path, probe_cls, model):
    probe = probe_cls(include="^does_not_exist", exclude="bias", name="picky")
    counter = _CountBatches()
    with pytest.raises(ProbeConfigurationError) as info:
        trainer(tmp_path, [probe, counter], max_steps=2).fit(model(), RandomDataModule())
    message = str(info.value)
    assert message.startswith(f"{probe_cls.__name__} 'picky' found no trainable parameter matching "
                              "include='^does_not_exist', exclude='bias'")
    # the layers configure_model built (or the lazy parameters, named before they have a shape)
    assert message.endswith("Trainable parameters: net.1.weight, net.1.bias, net.3.weight, net.3.bias")
    assert counter.batches == 0


def test_a_model_without_trainable_parameters_skips_the_default_probe(tmp_path):
    class Frozen(Net):
        def configure_optimizers(self):
            return None

        def training_step(self, batch, batch_idx):
            return None

    model = Frozen(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).requires_grad_(False))
    probe = GradientStatsMonitor(output_dir=str(tmp_path))
    with pytest.warns(ProbeSkippedWarning, match="no trainable parameter"):
        trainer(tmp_path, [probe], max_steps=2).fit(model, RandomDataModule())
    assert [r["probe_status"] for r in read(tmp_path / "gradient_stats.jsonl")] == ["skipped"]


# -- the same instances in a second fit --------------------------------------------------------------
def test_the_same_probes_in_a_second_fit_start_clean(tmp_path):
    stats = GradientStatsMonitor(every_n_steps=4, window=2)
    dynamics = GradientDynamicsMonitor(every_n_steps=4)
    for run in ("first", "second"):
        root = tmp_path / run
        model = Net(nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10)))
        recorder = _fit(root, model, [stats, dynamics], max_epochs=1)  # 6 steps; probes under root/probes
        records = read(root / "probes" / "gradient_stats.jsonl")
        assert sorted({r["step"] for r in records}) == [0, 4], run
        assert _grad_stats_match(records, recorder) == 2 * 5
        flow = (root / "probes" / "gradient_stats" / "gradient_flow.json").read_text()
        assert '"window": 2' in flow
        records = read(root / "probes" / "gradient_dynamics.jsonl")
        assert sorted({r["step"] for r in records}) == [0, 4], run
        assert [r["has_previous"] for r in records if r["layer"] == "__total__"] == [False, True]
        assert _dynamics_norms_match(records, recorder) == 2 * 5
        assert len(dynamics._sign_rows) == 1  # this fit's epoch only
        assert stats._optimizer_steps == dynamics._optimizer_steps == {0: 6}
    assert dynamics._hooks == []


def test_first_window_of_a_second_fit_is_its_own(tmp_path):
    import json

    stats = GradientStatsMonitor(every_n_steps=50, window=2)
    for run in ("first", "second"):
        root = tmp_path / run
        model = Net(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), lr=0.5 if run == "first" else 0.01)
        recorder = _fit(root, model, [stats], max_epochs=1)
        flow = json.loads((root / "probes" / "gradient_stats" / "gradient_flow.json").read_text())
        steps = recorder.by_step()
        for i, layer in enumerate(flow["layers"]):
            pooled = np.concatenate([np.abs(steps[s]["grads"][layer].numpy().ravel()) for s in (0, 1)])
            assert flow["first"]["mean"][i] == pytest.approx(pooled.mean(), rel=1e-5)


# -- failures in the optimiser post-step hooks -------------------------------------------------------
def _failing_after_step(monkeypatch, at_call):
    original = GradientDynamicsMonitor._after_step
    calls = []

    def after_step(self, trainer, optimizer, *rest):  # what the optimizer's post-step hook runs
        calls.append(trainer.global_step)
        if len(calls) == at_call:
            raise RuntimeError("post-hook boom")
        return original(self, trainer, optimizer, *rest)

    monkeypatch.setattr(GradientDynamicsMonitor, "_after_step", after_step)
    return calls


def test_a_post_hook_failure_disables_the_probe_and_training_goes_on(tmp_path, monkeypatch):
    calls = _failing_after_step(monkeypatch, at_call=2)
    probe = GradientDynamicsMonitor(every_n_steps=1, output_dir=str(tmp_path), on_error="warn")

    class Watch(pl.Callback):
        hooks_after_disable = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if probe.disabled and self.hooks_after_disable is None:
                self.hooks_after_disable = len(trainer.optimizers[0]._optimizer_step_post_hooks)

    watch = Watch()
    t = trainer(tmp_path, [probe, watch], max_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(Net(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))), RandomDataModule())
    assert t.global_step == 5  # training went on
    disabled = [w for w in caught if issubclass(w.category, ProbeDisabledWarning)]
    assert len(disabled) == 1 and "post-hook boom" in str(disabled[0].message)
    assert "optimizer step post-hook" in str(disabled[0].message)
    records = read(tmp_path / "gradient_dynamics.jsonl")
    assert records[-1]["probe_status"] == "disabled"
    assert records[-1]["hook"].startswith("optimizer step post-hook")
    assert records[-1]["step"] == 1
    assert {r["step"] for r in records if "probe_status" not in r} == {0}
    assert calls == [0, 1]  # a disabled probe does nothing more in its hook
    assert watch.hooks_after_disable == 1  # left in place (torch iterates over them), inert
    assert probe._hooks == [] and t.optimizers[0]._optimizer_step_post_hooks == {}  # removed at teardown


def test_a_post_hook_failure_reraises_with_a_note_under_raise(tmp_path, monkeypatch):
    _failing_after_step(monkeypatch, at_call=1)
    probe = GradientDynamicsMonitor(every_n_steps=1, output_dir=str(tmp_path), on_error="raise")
    t = trainer(tmp_path, [probe], max_steps=3)
    with pytest.raises(RuntimeError, match="post-hook boom") as info:
        t.fit(Net(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))), RandomDataModule())
    assert any("GradientDynamicsMonitor 'gradient_dynamics'" in n for n in getattr(info.value, "__notes__", []))
    assert probe._hooks == []


def test_disabling_in_a_lightning_hook_removes_the_post_hooks(tmp_path, monkeypatch):
    from lightning_probes.callbacks import gradient_dynamics

    probe = GradientDynamicsMonitor(every_n_steps=1, output_dir=str(tmp_path), on_error="warn", compile=False)
    original = gradient_dynamics.sample_of

    def sample_of(*args):  # in `on_before_optimizer_step` (a guarded Lightning hook)
        if probe._optimizer_steps.get(0, 0) >= 2:
            raise RuntimeError("selection boom")
        return original(*args)

    monkeypatch.setattr(gradient_dynamics, "sample_of", sample_of)
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((probe.disabled is not None, len(trainer.optimizers[0]._optimizer_step_post_hooks)))

    with pytest.warns(ProbeDisabledWarning, match="selection boom"):
        trainer(tmp_path, [probe, Watch()], max_steps=4).fit(
            Net(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))), RandomDataModule())
    assert seen == [(False, 1), (True, 0), (True, 0), (True, 0)]  # removed at once, by `on_disable`


# -- epochs of unknown length ------------------------------------------------------------------------
class _Stream(torch.utils.data.IterableDataset):
    """An iterable dataset (no ``len``): 5 batches of 16 per epoch."""

    def __init__(self):
        self.data = RandomDataModule(n=80)

    def __iter__(self):
        yield from zip(self.data.x, self.data.y)


def test_last_window_of_an_epoch_of_unknown_length(tmp_path):
    import json

    stats = GradientStatsMonitor(every_n_steps=50, window=3, output_dir=str(tmp_path))
    recorder = GradRecorder()
    model = Net(nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10)))
    trainer(tmp_path, [recorder, stats], max_epochs=2).fit(
        model, torch.utils.data.DataLoader(_Stream(), batch_size=16))
    assert [s["step"] for s in recorder.steps] == list(range(10))
    flow = json.loads((tmp_path / "gradient_stats" / "gradient_flow.json").read_text())
    steps = recorder.by_step()
    for label, window_steps in (("first", [0, 1, 2]), ("last", [7, 8, 9])):  # the last 3 steps of epoch 2
        for i, layer in enumerate(flow["layers"]):
            pooled = np.concatenate([np.abs(steps[s]["grads"][layer].numpy().ravel()) for s in window_steps])
            assert flow[label]["mean"][i] == pytest.approx(pooled.mean(), rel=1e-5), (label, layer)
            assert flow[label]["std"][i] == pytest.approx(pooled.std(), rel=1e-4, abs=1e-10), (label, layer)


def test_last_window_with_two_optimizers_and_max_steps(tmp_path):
    import json

    from tests.callbacks.test_gradient_stats import _TwoOptimizers

    recorder = GradRecorder()
    stats = GradientStatsMonitor(every_n_steps=50, window=2, output_dir=str(tmp_path))
    trainer(tmp_path, [recorder, stats], max_steps=8, limit_val_batches=0).fit(_TwoOptimizers(), RandomDataModule())
    assert [s["step"] for s in recorder.steps] == list(range(8))  # 4 batches, the two optimizers in turn
    flow = json.loads((tmp_path / "gradient_stats" / "gradient_flow.json").read_text())
    steps = recorder.by_step()
    for i, layer in enumerate(flow["layers"]):
        last = [4, 6] if layer.startswith("a.") else [5, 7]  # each optimizer's last 2 steps
        pooled = np.concatenate([np.abs(steps[s]["grads"][layer].numpy().ravel()) for s in last])
        assert flow["last"]["mean"][i] == pytest.approx(pooled.mean(), rel=1e-5), layer
