import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_probes import GradientStatsMonitor
from tests.conftest import CaptureLogger
from tests.helpers import GradRecorder, RandomDataModule, read, small_mlp, trainer


def _check_against_reference(records, recorder, rel=1e-5):
    steps = recorder.by_step()
    checked = 0
    for r in records:
        grads = steps[r["step"]]["grads"]
        if r["layer"] == "__total__":
            a = np.concatenate([np.abs(g.numpy().ravel()) for g in grads.values()])
        else:
            a = np.abs(grads[r["layer"]].numpy().ravel())
        assert r["grad_abs_mean"] == pytest.approx(a.mean(), rel=rel, abs=1e-12)
        assert r["grad_abs_std"] == pytest.approx(a.std(), rel=max(rel, 1e-4), abs=1e-9)
        assert r["grad_norm"] == pytest.approx(np.linalg.norm(a), rel=rel)
        assert r["grad_abs_max"] == pytest.approx(a.max(), rel=rel)
        assert r["nonfinite"] == 0
        checked += 1
    return checked


def test_statistics_match_an_independent_recorder(tmp_path):
    recorder = GradRecorder()
    logger = CaptureLogger()
    probe = GradientStatsMonitor(every_n_steps=3, window=2, output_dir=str(tmp_path / "out"))
    trainer(tmp_path, [recorder, probe], logger=logger, max_epochs=2, log_every_n_steps=1).fit(
        small_mlp(), RandomDataModule())
    records = read(tmp_path / "out" / "gradient_stats.jsonl")
    steps = sorted({r["step"] for r in records})
    assert steps == list(range(0, 12, 3))  # 6 batches x 2 epochs, every 3rd step
    layers = [n for n, p in small_mlp().named_parameters()]
    assert {r["layer"] for r in records} == set(layers) | {"__total__"}
    assert _check_against_reference(records, recorder) == len(steps) * (len(layers) + 1)
    assert "gradient_stats/grad_norm/net.fc1.weight" in logger.keys()
    assert "gradient_stats/grad_abs_std/__total__" in logger.keys()

    flow = json.loads((tmp_path / "out" / "gradient_stats" / "gradient_flow.json").read_text())
    assert flow["layers"] == layers
    by_step = recorder.by_step()
    for label, window_steps in (("first", [0, 1]), ("last", [10, 11])):
        for i, layer in enumerate(layers):
            pooled = np.concatenate([np.abs(by_step[s]["grads"][layer].numpy().ravel()) for s in window_steps])
            assert flow[label]["mean"][i] == pytest.approx(pooled.mean(), rel=1e-5)
            assert flow[label]["std"][i] == pytest.approx(pooled.std(), rel=1e-4, abs=1e-10)
    assert (tmp_path / "out" / "gradient_stats" / "gradient_flow.png").stat().st_size > 1000
    assert "gradient_stats/gradient_flow" in logger.figures


def test_loggers_follow_log_every_n_steps(tmp_path):
    logger = CaptureLogger()
    probe = GradientStatsMonitor(every_n_steps=2, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], logger=logger, max_epochs=2, log_every_n_steps=5).fit(small_mlp(), RandomDataModule())
    logged = sorted({step for step, metrics in logger.metrics if "gradient_stats/grad_norm/__total__" in metrics})
    assert logged == [0, 6]  # logged steps 0, 2, ..., 10: at most one logger write per 5 steps
    assert sorted({r["step"] for r in read(tmp_path / "gradient_stats.jsonl")}) == [0, 2, 4, 6, 8, 10]


def test_accumulation_logs_once_per_optimizer_step(tmp_path):
    recorder = GradRecorder()
    probe = GradientStatsMonitor(every_n_steps=1, output_dir=str(tmp_path))
    t = trainer(tmp_path, [recorder, probe], max_epochs=1, accumulate_grad_batches=2)
    t.fit(small_mlp(), RandomDataModule())
    records = [r for r in read(tmp_path / "gradient_stats.jsonl") if r["layer"] == "__total__"]
    assert [r["step"] for r in records] == [0, 1, 2] == [s["step"] for s in recorder.steps]
    _check_against_reference(records, recorder)


def test_frozen_and_filtered_parameters_are_left_out(tmp_path):
    model = small_mlp()
    model.net.fc1.weight.requires_grad_(False)
    probe = GradientStatsMonitor(every_n_steps=1, exclude=r"\.bias$", output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_steps=2).fit(model, RandomDataModule())
    layers = {r["layer"] for r in read(tmp_path / "gradient_stats.jsonl")}
    assert "net.fc1.weight" not in layers and not any(name.endswith(".bias") for name in layers)
    assert "net.fc2.weight" in layers


def test_bf16_mixed_precision(tmp_path):
    recorder = GradRecorder()
    probe = GradientStatsMonitor(every_n_steps=1, output_dir=str(tmp_path))
    trainer(tmp_path, [recorder, probe], max_steps=3, precision="bf16-mixed").fit(small_mlp(), RandomDataModule())
    records = read(tmp_path / "gradient_stats.jsonl")
    assert len({r["step"] for r in records}) == 3
    _check_against_reference(records, recorder)


class _InjectNaN(pl.Callback):
    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == 1:
            pl_module.net.fc2.weight.grad[0, :3] = float("nan")


def test_nonfinite_gradients_are_counted_and_warned_once(tmp_path):
    probe = GradientStatsMonitor(every_n_steps=1, output_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="non-finite gradients at step 1") as warned:
        trainer(tmp_path, [_InjectNaN(), probe], max_steps=4).fit(small_mlp(lr=1e-3), RandomDataModule())
    assert sum("GradientStatsMonitor" in str(w.message) for w in warned) == 1
    records = {(r["step"], r["layer"]): r for r in read(tmp_path / "gradient_stats.jsonl")}
    assert records[(1, "net.fc2.weight")]["nonfinite"] == 3
    assert records[(1, "net.fc2.weight")]["grad_norm"] is None  # NaN is written as null
    assert records[(1, "__total__")]["nonfinite"] == 3
    assert records[(0, "__total__")]["nonfinite"] == 0
    assert max(s for s, _ in records) == 3  # training went on


def test_compiled_submodule_names_are_clean(tmp_path):
    model = small_mlp()
    model.net = torch.compile(model.net, backend="eager")
    probe = GradientStatsMonitor(every_n_steps=1, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_steps=1).fit(model, RandomDataModule())
    layers = {r["layer"] for r in read(tmp_path / "gradient_stats.jsonl")}
    assert "net.fc1.weight" in layers and not any("_orig_mod" in name for name in layers)


class _TwoOptimizers(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a = torch.nn.Linear(64, 16)
        self.b = torch.nn.Linear(16, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for opt in (opt_a, opt_b):
            loss = torch.nn.functional.cross_entropy(self.b(torch.relu(self.a(x.flatten(1)))), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)


def test_manual_optimisation_with_two_optimizers(tmp_path):
    recorder = GradRecorder()
    probe = GradientStatsMonitor(every_n_steps=2, output_dir=str(tmp_path))
    trainer(tmp_path, [recorder, probe], max_epochs=1, limit_val_batches=0).fit(_TwoOptimizers(), RandomDataModule())
    records = [r for r in read(tmp_path / "gradient_stats.jsonl") if r["layer"] != "__total__"]
    for opt, layers in ((0, {"a.weight", "a.bias"}), (1, {"b.weight", "b.bias"})):
        mine = [r for r in records if r["optimizer"] == opt]
        assert {r["layer"] for r in mine} == layers
        assert len(mine) == 3 * 2  # 6 steps of this optimiser, every 2nd logged, 2 tensors each
    steps = recorder.by_step()
    for r in records:
        a = np.abs(steps[r["step"]]["grads"][r["layer"]].numpy())
        assert r["grad_norm"] == pytest.approx(np.linalg.norm(a), rel=1e-5)


def test_resume_neither_duplicates_nor_drops_records(tmp_path):
    out = tmp_path / "out"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    kw = dict(enable_checkpointing=True)
    trainer(tmp_path, [GradientStatsMonitor(every_n_steps=1, output_dir=str(out)), ckpt], max_epochs=3, **kw).fit(
        small_mlp(), RandomDataModule())
    first_run = read(out / "gradient_stats.jsonl")
    assert sorted({r["step"] for r in first_run}) == list(range(18))
    # Resume from the end of epoch 1 (step 12): steps 12..17 are produced again and must replace the old ones.
    ckpt_path = next(p for p in (tmp_path / "ckpt").iterdir() if "epoch=1" in p.name)
    probe = GradientStatsMonitor(every_n_steps=1, output_dir=str(out))
    trainer(tmp_path, [probe], max_epochs=3).fit(small_mlp(), RandomDataModule(), ckpt_path=str(ckpt_path))
    records = read(out / "gradient_stats.jsonl")
    keys = [(r["step"], r["layer"]) for r in records]
    assert len(keys) == len(set(keys))
    assert sorted({r["step"] for r in records}) == list(range(18))


def test_no_matching_parameter_is_one_clear_error(tmp_path):
    probe = GradientStatsMonitor(include="^does_not_exist")
    with pytest.raises(ValueError, match="no trainable parameter matching.*Trainable parameters: net.fc1.weight"):
        trainer(tmp_path, [probe], max_steps=1).fit(small_mlp(), RandomDataModule())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"every_n_steps": 0}, "`every_n_steps` to be a positive integer, but got 0"),
    ({"window": -1}, "`window`"),
    ({"histogram_every_n_steps": 0}, "`histogram_every_n_steps`"),
    ({"include": "("}, "`include`"),
    ({"output_dir": 3}, "`output_dir`"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientStatsMonitor(**kwargs)


def test_histograms_go_to_tensorboard(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    probe = GradientStatsMonitor(every_n_steps=1, histogram_every_n_steps=2)
    trainer(tmp_path, [probe], max_steps=4, logger=logger).fit(small_mlp(), RandomDataModule())
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0}).Reload()
    assert "gradient_stats/histogram/net.fc1.weight" in events.Tags()["histograms"]
    assert len(events.Histograms("gradient_stats/histogram/net.fc1.weight")) == 2
    assert (tmp_path / "tb" / "version_0" / "probes" / "gradient_stats.jsonl").exists()


def test_float64_training_matches_the_recorder(tmp_path):
    # "64-true" converts the parameters after the callbacks' `setup`, as a device move does: the probe must
    # meet float64 gradients at the step, keep them float64, and read the parameters the optimiser steps.
    recorder = GradRecorder()
    probe = GradientStatsMonitor(every_n_steps=2, window=2, output_dir=str(tmp_path))
    t = trainer(tmp_path, [recorder, probe], max_epochs=1, precision="64-true")
    t.fit(small_mlp(), RandomDataModule())
    stepped = [p for group in t.optimizers[0].param_groups for p in group["params"]]
    assert all(p.dtype == torch.float64 for p in probe._params)
    assert {id(p) for p in probe._params} == {id(p) for p in stepped}
    records = read(tmp_path / "gradient_stats.jsonl")
    assert sorted({r["step"] for r in records}) == [0, 2, 4]
    assert _check_against_reference(records, recorder, rel=1e-9) == 3 * 12  # computed in float64
    assert probe._first_window.dtype == torch.float64
    flow = json.loads((tmp_path / "gradient_stats" / "gradient_flow.json").read_text())
    pooled = np.concatenate([np.abs(recorder.by_step()[s]["grads"]["net.fc1.weight"].numpy().ravel())
                             for s in (0, 1)])
    assert flow["first"]["mean"][0] == pytest.approx(pooled.mean(), rel=1e-9)


def test_parameters_replaced_after_setup_are_followed(tmp_path):
    # With this switch, `module.double()` makes new Parameter objects after `setup`: the ones captured there are
    # stale (no gradient), and the probe must track the ones the optimiser steps.
    recorder = GradRecorder()
    probe = GradientStatsMonitor(every_n_steps=1, output_dir=str(tmp_path))
    before = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        trainer(tmp_path, [recorder, probe], max_steps=3, precision="64-true").fit(small_mlp(), RandomDataModule())
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(before)
    totals = [r for r in read(tmp_path / "gradient_stats.jsonl") if r["layer"] == "__total__"]
    assert [r["step"] for r in totals] == [0, 1, 2]
    for r in totals:
        grads = recorder.by_step()[r["step"]]["grads"]
        expected = np.linalg.norm(np.concatenate([g.numpy().ravel() for g in grads.values()]))
        assert r["grad_norm"] == pytest.approx(expected, rel=1e-9)


class _RepairNaN(pl.Callback):
    """After the probe has seen them, make injected NaN gradients finite again, so training stays finite."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for p in pl_module.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(0.0)


def test_headline_metrics_for_early_stopping(tmp_path):
    from pytorch_lightning.callbacks import EarlyStopping

    seen = []

    class Spy(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("gradient_stats/")})

    early = EarlyStopping(monitor="gradient_stats/nonfinite_epoch", mode="min", check_on_train_epoch_end=True)
    probe = GradientStatsMonitor(every_n_steps=1, output_dir=str(tmp_path))
    # EarlyStopping first: Lightning runs monitoring callbacks' epoch-end hooks after the others.
    with pytest.warns(UserWarning, match="non-finite gradients at step 1"):
        trainer(tmp_path, [early, _InjectNaN(), probe, _RepairNaN(), Spy()], max_epochs=2).fit(
            small_mlp(), RandomDataModule())
    totals = [r for r in read(tmp_path / "gradient_stats.jsonl") if r["layer"] == "__total__"]
    assert [s["gradient_stats/nonfinite_epoch"] for s in seen] == [3, 0]  # step 1 in epoch 0 only
    last_of_epoch = [max((r for r in totals if r["epoch"] == e), key=lambda r: r["step"]) for e in (0, 1)]
    assert [s["gradient_stats/grad_norm/__total__"] for s in seen] == pytest.approx(
        [r["grad_norm"] for r in last_of_epoch])
    assert float(early.best_score) == 0


def test_window_state_round_trip_and_device_follow(tmp_path):
    probe = GradientStatsMonitor(every_n_steps=1, window=2, output_dir=str(tmp_path))
    trainer(tmp_path, [_InjectNaN(), probe, _RepairNaN()], max_steps=3).fit(small_mlp(), RandomDataModule())
    state = probe.state_dict()
    path = tmp_path / "state.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)  # what Lightning's checkpoint loading accepts
    fresh = GradientStatsMonitor(every_n_steps=1, window=2)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh._first_window, probe._first_window.cpu()) and fresh._first_window.device.type == "cpu"
    assert fresh._nonfinite_count == (0, 3) and fresh._last_total_norm == probe._last_total_norm
    # Restored state moves to the device of the gradients met at the first step that uses it.
    fresh._params = probe._params
    first, last = fresh._windows_on(torch.device("meta"))
    assert first.device.type == "meta" and last.device.type == "meta" and first.shape == (11, 3)


class _HistogramLogger(CaptureLogger):
    def __init__(self):
        super().__init__()
        self.histograms: list[str] = []

    def add_histogram(self, tag, values, global_step=None):
        self.histograms.append(tag)


def test_two_named_monitors_write_apart(tmp_path):
    logger = _HistogramLogger()
    weights = GradientStatsMonitor(every_n_steps=2, histogram_every_n_steps=4, include=r"weight$", name="weights",
                                   output_dir=str(tmp_path))
    biases = GradientStatsMonitor(every_n_steps=3, include=r"bias$", name="biases", output_dir=str(tmp_path))
    assert weights.state_key != biases.state_key
    t = trainer(tmp_path, [weights, biases], logger=logger, max_epochs=1, log_every_n_steps=1)
    t.fit(small_mlp(), RandomDataModule())
    w_records, b_records = read(tmp_path / "weights.jsonl"), read(tmp_path / "biases.jsonl")
    assert {r["layer"] for r in w_records} - {"__total__"} == {n for n in weights._names if n.endswith("weight")}
    assert all(r["layer"].endswith("bias") or r["layer"] == "__total__" for r in b_records)
    assert sorted({r["step"] for r in w_records}) == [0, 2, 4] and sorted({r["step"] for r in b_records}) == [0, 3]
    assert json.loads((tmp_path / "weights" / "gradient_flow.json").read_text())["layers"] == weights._names
    assert json.loads((tmp_path / "biases" / "gradient_flow.json").read_text())["layers"] == biases._names
    assert {"weights/grad_norm/net.fc1.weight", "biases/grad_norm/net.bn1.bias"} <= logger.keys()
    assert not any(k.startswith("gradient_stats/") for k in logger.keys())
    assert {"weights/gradient_flow", "biases/gradient_flow"} <= set(logger.figures)
    assert "weights/histogram/net.fc1.weight" in logger.histograms and len(logger.histograms) == 2 * 7  # steps 0, 4
    assert not any(tag.startswith("biases/") for tag in logger.histograms)
    assert {"weights/nonfinite_epoch", "biases/nonfinite_epoch", "biases/grad_norm/__total__"} <= set(
        t.callback_metrics)


def test_layout_has_one_chart_per_logged_statistic(tmp_path):
    import re

    logger = CaptureLogger()
    probe = GradientStatsMonitor(every_n_steps=1, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], logger=logger, max_steps=1).fit(small_mlp(), RandomDataModule())
    layout = probe.layout()
    assert set(layout) == {"grad_abs_mean", "grad_abs_std", "grad_norm", "grad_abs_max", "nonfinite"}
    for stat, (kind, [pattern]) in layout.items():
        assert kind == "Multiline"
        matched = {k for k in logger.keys() if re.search(pattern, k)}
        assert f"gradient_stats/{stat}/__total__" in matched and len(matched) == 12, stat


def test_compile_failure_runs_eagerly(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    recorder = GradRecorder()
    probe = GradientStatsMonitor(every_n_steps=1, output_dir=str(tmp_path), compile=True)
    trainer(tmp_path, [recorder, probe], max_steps=3).fit(small_mlp(), RandomDataModule())
    assert not probe._kernel.active and probe.compile_seconds == 0
    records = read(tmp_path / "gradient_stats.jsonl")
    assert _check_against_reference(records, recorder) == 3 * 12
