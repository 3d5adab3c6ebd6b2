import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import MixedPrecision

from lightning_probes import GradientDynamicsMonitor
from tests.conftest import CaptureLogger
from tests.helpers import GradRecorder, RandomDataModule, approx, read, small_mlp, trainer


def _reference(prev, now, layer, zero_thr=1e-7, rel_thr=1e-5):
    """Numpy computation of one record from full copies of gradients and weights."""
    def flat(step, key):
        if layer == "__total__":
            return np.concatenate([v.numpy().ravel() for k, v in step[key].items() if k in step["grads"]])
        return step[key][layer].numpy().ravel()

    g_prev, g_now = flat(prev, "grads"), flat(now, "grads")
    dw_prev = flat(prev, "after") - flat(prev, "before")
    dw_now = flat(now, "after") - flat(now, "before")
    below_prev = np.abs(g_prev) < rel_thr
    released = below_prev & (np.abs(g_now) >= rel_thr)
    nonzero = (g_prev != 0) & (g_now != 0)
    flipped = nonzero & (np.sign(g_prev) != np.sign(g_now))
    product = dw_prev * (g_now - g_prev)
    return {
        "zero_count": int((np.abs(g_now) < zero_thr).sum()),
        "released_fraction": released.sum() / below_prev.sum() if below_prev.sum() else None,
        "sign_flip_fraction": flipped.sum() / nonzero.sum(),
        "minima_crossings": int((flipped & (product > 0)).sum()),
        "maxima_crossings": int((flipped & (product < 0)).sum()),
        "update_norm": np.linalg.norm(dw_now),
        "weight_norm": np.linalg.norm(flat(now, "after")),
        "grad_norm": np.linalg.norm(g_now),
    }


def test_records_match_an_independent_recorder(tmp_path):
    recorder = GradRecorder()
    logger = CaptureLogger()
    probe = GradientDynamicsMonitor(every_n_steps=3, release_threshold=1e-3, output_dir=str(tmp_path))
    model = small_mlp(momentum=0.9, lr=0.2)
    trainer(tmp_path, [recorder, probe], logger=logger, max_epochs=2, log_every_n_steps=1).fit(
        model, RandomDataModule())
    records = read(tmp_path / "gradient_dynamics.jsonl")
    steps = recorder.by_step()
    assert sorted({r["step"] for r in records}) == [0, 3, 6, 9]
    checked = 0
    for r in records:
        if r["step"] == 0:
            assert r["has_previous"] is False and r["sign_flip_fraction"] is None
            continue
        ref = _reference(steps[r["step"] - 1], steps[r["step"]], r["layer"], rel_thr=1e-3)
        assert r["has_previous"] is True and r["skipped"] is False
        for key in ("zero_count", "minima_crossings", "maxima_crossings"):
            assert r[key] == ref[key], (r["step"], r["layer"], key)
        for key in ("released_fraction", "sign_flip_fraction", "update_norm", "weight_norm", "grad_norm"):
            if ref[key] is None:
                assert r[key] is None
            else:
                assert r[key] == approx(ref[key], rel=1e-5, abs=1e-9), (r["step"], r["layer"], key)
        assert r["retained_fraction"] == approx(None if ref["released_fraction"] is None
                                                else 1 - ref["released_fraction"])
        checked += 1
    assert checked == 3 * 12  # three compared steps, 11 tensors + total
    # With momentum, some flips cross maxima: both kinds occur over the run.
    totals = [r for r in records if r["layer"] == "__total__" and r["has_previous"]]
    assert sum(r["minima_crossings"] for r in totals) > 0
    assert "gradient_dynamics/sign_flip_fraction/__total__" in logger.keys()
    assert "gradient_dynamics/epoch_mean_sign_flip_fraction/__total__" in logger.keys()
    for name in ("gradient_sign_map.png", "gradient_sign_map_zoom.png", "gradient_dynamics.png"):
        assert (tmp_path / "gradient_dynamics" / name).stat().st_size > 1000
    assert {"gradient_dynamics/sign_map", "gradient_dynamics/sign_map_zoom",
            "gradient_dynamics/over_training"} <= set(logger.figures)
    assert len(probe._sign_rows) == 2  # one row per epoch


def test_ema_of_norms(tmp_path):
    probe = GradientDynamicsMonitor(every_n_steps=1, ema_decay=0.5, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_steps=4).fit(small_mlp(), RandomDataModule())
    totals = [r for r in read(tmp_path / "gradient_dynamics.jsonl") if r["layer"] == "__total__"]
    ema = None
    for r in totals:
        ema = r["grad_norm"] if ema is None else 0.5 * ema + 0.5 * r["grad_norm"]
        assert r["grad_norm_ema"] == pytest.approx(ema)


def test_state_between_steps_is_one_byte_per_entry(tmp_path):
    seen = {}

    class Inspect(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            probe = trainer.callbacks[0]
            assert probe._pending == {}  # no weight copy survives a step
            state = [prev.state for prev in probe._previous.values()]
            seen[batch_idx] = sum(t.numel() * t.element_size() for t in state)
            assert all(t.dtype == torch.int8 for t in state)

    probe = GradientDynamicsMonitor(every_n_steps=4, output_dir=str(tmp_path))
    model = small_mlp()
    trainer(tmp_path, [probe, Inspect()], max_epochs=1).fit(model, RandomDataModule())
    entries = sum(p.numel() for p in model.parameters())
    assert seen[4] == entries  # after the snapshot step 3, before logged step 4
    assert seen[1] == 0 and seen[5] == 0


def test_amp_skipped_step(tmp_path):
    class InjectInf(pl.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 3:
                pl_module.net.fc1.weight.grad[0, 0] = float("inf")

    scaler = torch.amp.GradScaler("cpu")
    probe = GradientDynamicsMonitor(every_n_steps=1, output_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="skipped by the AMP GradScaler"):
        trainer(tmp_path, [InjectInf(), probe], max_steps=6,
                plugins=[MixedPrecision("16-mixed", "cpu", scaler)]).fit(small_mlp(), RandomDataModule())
    totals = {r["step"]: r for r in read(tmp_path / "gradient_dynamics.jsonl") if r["layer"] == "__total__"}
    assert totals[3]["skipped"] is True and totals[3]["update_norm"] is None
    assert totals[3]["sign_flip_fraction"] is None
    assert totals[4]["skipped"] is False and totals[4]["has_previous"] is False  # no polluted comparison
    assert totals[5]["has_previous"] is True and totals[5]["update_norm"] > 0
    assert totals[2]["has_previous"] is True


def test_resume_marks_first_step_without_previous(tmp_path, monkeypatch):
    from lightning_probes.callbacks import _gradient_figures

    drawn = []
    original = _gradient_figures.line_panels

    def spy(x, *args, **kwargs):
        drawn.append(list(x))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(_gradient_figures, "line_panels", spy)
    out = tmp_path / "out"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer(tmp_path, [GradientDynamicsMonitor(every_n_steps=1, output_dir=str(out)), ckpt], max_epochs=3,
            enable_checkpointing=True).fit(small_mlp(), RandomDataModule())
    ckpt_path = next(p for p in (tmp_path / "ckpt").iterdir() if "epoch=1" in p.name)
    probe = GradientDynamicsMonitor(every_n_steps=1, output_dir=str(out))
    trainer(tmp_path, [probe], max_epochs=3).fit(small_mlp(), RandomDataModule(), ckpt_path=str(ckpt_path))
    totals = [r for r in read(out / "gradient_dynamics.jsonl") if r["layer"] == "__total__"]
    assert [r["step"] for r in totals] == list(range(18))
    assert [r["step"] for r in totals if not r["has_previous"]] == [0, 12]
    assert len(probe._sign_rows) == 3  # two rows restored from the checkpoint, one new
    assert drawn[-1] == list(range(18))  # the resumed run's figure covers the run from step 0


def test_hooks_removed_after_fit_and_on_exception(tmp_path):
    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")

    probe = GradientDynamicsMonitor(every_n_steps=1, output_dir=str(tmp_path))
    model = small_mlp()
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [probe, Boom()], max_steps=5).fit(model, RandomDataModule())
    assert probe._hooks == [] and probe._pending == {}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"zero_threshold": 0}, "`zero_threshold`"),
    ({"release_threshold": -1.0}, "`release_threshold`"),
    ({"ema_decay": 1.0}, r"`ema_decay` to be a finite number in \[0, 1\), but got 1.0"),
    ({"zero_threshold": float("nan")}, "`zero_threshold` to be a finite number in \\(0, inf\\)"),
    ({"max_columns": 0}, "`max_columns`"),
    ({"zoom_columns": (5, 2)}, "`zoom_columns`"),
    ({"every_n_steps": 1.5}, "`every_n_steps`"),
    ({"zero_threshold": 1e-3, "release_threshold": 1e-5}, "`zero_threshold` <= `release_threshold`"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientDynamicsMonitor(**kwargs)


def test_float64_training_matches_the_recorder(tmp_path):
    # "64-true" converts the parameters after the callbacks' `setup`, as a device move does: index tensors and
    # norms must follow the float64 gradients met at the step (a float32 norm of float64 tensors is an error).
    recorder = GradRecorder()
    probe = GradientDynamicsMonitor(every_n_steps=2, release_threshold=1e-3, output_dir=str(tmp_path))
    t = trainer(tmp_path, [recorder, probe], max_epochs=1, precision="64-true")
    t.fit(small_mlp(momentum=0.9, lr=0.2), RandomDataModule())
    stepped = [p for group in t.optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in probe._params} == {id(p) for p in stepped}
    records = read(tmp_path / "gradient_dynamics.jsonl")
    steps = recorder.by_step()
    assert sorted({r["step"] for r in records}) == [0, 2, 4]
    compared = [r for r in records if r["step"] > 0]
    assert len(compared) == 2 * 12 and all(r["has_previous"] for r in compared)
    for r in compared:
        ref = _reference(steps[r["step"] - 1], steps[r["step"]], r["layer"], rel_thr=1e-3)
        for key in ("zero_count", "minima_crossings", "maxima_crossings"):
            assert r[key] == ref[key], (r["step"], r["layer"], key)
        for key in ("sign_flip_fraction", "update_norm", "weight_norm", "grad_norm"):
            assert r[key] == approx(ref[key], rel=1e-9, abs=1e-12), (r["step"], r["layer"], key)
    assert len(probe._sign_rows) == 1 and probe._sign_rows[0].shape == (probe._n_columns,)


def test_epoch_means_are_published_on_every_epoch(tmp_path):
    from pytorch_lightning.callbacks import EarlyStopping

    seen = []

    class Spy(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if "epoch_mean" in k})

    monitor = "gradient_dynamics/epoch_mean_sign_flip_fraction/__total__"
    early = EarlyStopping(monitor=monitor, mode="min", check_on_train_epoch_end=True)
    probe = GradientDynamicsMonitor(every_n_steps=1, output_dir=str(tmp_path))
    trainer(tmp_path, [early, probe, Spy()], max_epochs=2).fit(small_mlp(), RandomDataModule())
    totals = [r for r in read(tmp_path / "gradient_dynamics.jsonl") if r["layer"] == "__total__"]
    assert len(seen) == 2
    for epoch, published in enumerate(seen):
        mine = [r for r in totals if r["epoch"] == epoch]
        for stat in ("zero_fraction", "released_fraction", "retained_fraction", "sign_flip_fraction", "update_norm"):
            values = [r[stat] for r in mine if r[stat] is not None]
            key = f"gradient_dynamics/epoch_mean_{stat}/__total__"
            if values:  # released/retained are undefined at a step with no entry under the release threshold
                assert published[key] == pytest.approx(np.mean(values))
    assert early.best_score is not None


def test_state_round_trip(tmp_path):
    probe = GradientDynamicsMonitor(every_n_steps=2, ema_decay=0.5, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_steps=9).fit(small_mlp(), RandomDataModule())  # stops 3 steps into epoch 1
    path = tmp_path / "state.pt"
    torch.save(probe.state_dict(), path)
    fresh = GradientDynamicsMonitor(every_n_steps=2, ema_decay=0.5)
    fresh.load_state_dict(torch.load(path, weights_only=True))  # what Lightning's checkpoint loading accepts
    assert len(fresh._sign_rows) == 2 and fresh._sign_epochs == probe._sign_epochs == [0, 1]
    assert all(np.array_equal(a, b) and a.dtype == np.int8 for a, b in zip(fresh._sign_rows, probe._sign_rows))
    assert fresh._ema == probe._ema and set(fresh._ema) == set(probe._names) | {"__total__"}
    np.testing.assert_array_equal(fresh._latest_row, probe._latest_row)
    assert fresh._epoch_sums == probe._epoch_sums and fresh._epoch_sums["update_norm"][1] == 2  # steps 6, 8
    assert fresh._optimizer_steps == {0: 9} and fresh._previous == {}


def test_layout_has_one_chart_per_logged_statistic(tmp_path):
    import re

    pl.seed_everything(0)
    logger = CaptureLogger()
    probe = GradientDynamicsMonitor(every_n_steps=1, release_threshold=1e-2, output_dir=str(tmp_path),
                                    init_distance=True)
    trainer(tmp_path, [probe], logger=logger, max_steps=2, log_every_n_steps=1).fit(small_mlp(), RandomDataModule())
    layout = probe.layout()
    assert len(layout) == 16 and len(GradientDynamicsMonitor().layout()) == 14
    charted = set()
    for stat, (_, [pattern]) in layout.items():
        matched = {k for k in logger.keys() if re.search(pattern, k)}
        assert f"gradient_dynamics/{stat}/__total__" in matched, stat  # per-layer fractions may be undefined
        charted |= matched
    per_layer = {k for k in logger.keys() if k.startswith("gradient_dynamics/") and "epoch_mean" not in k}
    assert charted == per_layer  # every per-layer scalar has a chart


def test_compiled_kernels_give_the_eager_records(tmp_path):
    # compile=True: the fused torch.compile kernels (both probes). Counts, fractions and flags are identical to
    # the eager run; norms agree to float rounding (float64 sums in another order); both match the recorder.
    from lightning_probes import GradientStatsMonitor

    runs = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        recorder = GradRecorder()
        probes = [GradientDynamicsMonitor(every_n_steps=2, release_threshold=1e-3, output_dir=str(out),
                                          compile=compiled),
                  GradientStatsMonitor(every_n_steps=2, output_dir=str(out), compile=compiled)]
        pl.seed_everything(0)
        trainer(tmp_path, [recorder, *probes], max_epochs=1).fit(small_mlp(momentum=0.9, lr=0.2), RandomDataModule())
        runs[compiled] = (read(out / "gradient_dynamics.jsonl"), read(out / "gradient_stats.jsonl"), recorder)
        assert all(p._kernel_before.active if hasattr(p, "_kernel_before") else p._kernel.active
                   for p in probes) is compiled
        assert (probes[0].compile_seconds > 0) is compiled
        assert probes[0]._previous == {} or all(s.state.dtype == torch.int8 for s in probes[0]._previous.values())
    (eager, eager_stats, _), (fused, fused_stats, recorder) = runs[False], runs[True]
    assert [(r["step"], r["layer"]) for r in eager] == [(r["step"], r["layer"]) for r in fused]
    steps = recorder.by_step()
    for a, b in zip(eager, fused):
        for key, value in a.items():
            if "norm" in key or key in ("update_ratio", "update_rms"):
                assert b[key] == approx(value, rel=1e-6), (a["step"], a["layer"], key)
            else:
                assert b[key] == value, (a["step"], a["layer"], key)
        if b["has_previous"]:
            ref = _reference(steps[b["step"] - 1], steps[b["step"]], b["layer"], rel_thr=1e-3)
            for key in ("zero_count", "minima_crossings", "maxima_crossings"):
                assert b[key] == ref[key]
            for key in ("update_norm", "weight_norm", "grad_norm"):
                assert b[key] == approx(ref[key], rel=1e-6)
    for a, b in zip(eager_stats, fused_stats):
        assert a.keys() == b.keys() and a["layer"] == b["layer"] and a["nonfinite"] == b["nonfinite"]
        for key in ("grad_abs_mean", "grad_abs_std", "grad_norm", "grad_abs_max"):
            assert b[key] == approx(a[key], rel=1e-5, abs=1e-12), (a["step"], a["layer"], key)


def test_compile_failure_runs_eagerly(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    recorder = GradRecorder()
    probe = GradientDynamicsMonitor(every_n_steps=1, release_threshold=1e-3, output_dir=str(tmp_path), compile=True)
    trainer(tmp_path, [recorder, probe], max_steps=3).fit(small_mlp(momentum=0.9, lr=0.2), RandomDataModule())
    assert not probe._kernel_before.active and not probe._kernel_after.active and probe.compile_seconds == 0
    steps = recorder.by_step()
    records = [r for r in read(tmp_path / "gradient_dynamics.jsonl") if r["has_previous"]]
    assert len(records) == 2 * 12
    for r in records:
        ref = _reference(steps[r["step"] - 1], steps[r["step"]], r["layer"], rel_thr=1e-3)
        assert (r["zero_count"], r["minima_crossings"], r["maxima_crossings"]) == (
            ref["zero_count"], ref["minima_crossings"], ref["maxima_crossings"])
        assert r["sign_flip_fraction"] == approx(ref["sign_flip_fraction"], rel=1e-9)


def test_max_entries_follows_a_fixed_seeded_subset(tmp_path):
    """With ``max_entries`` the counts, fractions and update norm are those of the NumPy reference on the subset
    (the same subset at every step), norms that need no state those of the whole tensors."""
    from lightning_probes.callbacks._entries import draw_subsets

    recorder = GradRecorder()
    probe = GradientDynamicsMonitor(every_n_steps=2, max_entries=20, seed=3, release_threshold=1e-3,
                                    output_dir=str(tmp_path))
    model = small_mlp(momentum=0.9, lr=0.2)
    names = [n for n, _ in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]
    trainer(tmp_path, [recorder, probe], max_epochs=1).fit(model, RandomDataModule())
    subsets = dict(zip(names, draw_subsets(numels, 20, 3)))
    assert all(len(s) == 20 for n, s in subsets.items() if s is not None)
    assert sum(s is None for s in subsets.values()) == sum(n <= 20 for n in numels) > 0

    def on_subset(step):
        out = {}
        for key in ("grads", "before", "after"):
            out[key] = {n: (v.reshape(-1) if subsets[n] is None else v.reshape(-1)[torch.from_numpy(
                subsets[n].astype(np.int64))]) for n, v in step[key].items()}
        return out

    steps = recorder.by_step()
    records = read(tmp_path / "gradient_dynamics.jsonl")
    checked = 0
    for r in records:
        full = numels[names.index(r["layer"])] if r["layer"] != "__total__" else sum(numels)
        expected = (min(full, 20) if r["layer"] != "__total__" else sum(min(n, 20) for n in numels))
        assert r["sampled_entries"] == expected
        if not r["has_previous"]:
            continue
        ref = _reference(on_subset(steps[r["step"] - 1]), on_subset(steps[r["step"]]), r["layer"], rel_thr=1e-3)
        whole = _reference(steps[r["step"] - 1], steps[r["step"]], r["layer"], rel_thr=1e-3)
        for key in ("zero_count", "minima_crossings", "maxima_crossings"):
            assert r[key] == ref[key], (r["step"], r["layer"], key)
        assert r["zero_fraction"] == approx(ref["zero_count"] / expected)
        for key in ("sign_flip_fraction", "released_fraction", "update_norm"):
            assert r[key] == approx(ref[key], rel=1e-5, abs=1e-12), (r["step"], r["layer"], key)
        for key in ("grad_norm", "weight_norm"):  # no state needed: over the whole tensors
            assert r[key] == approx(whole[key], rel=1e-5), (r["step"], r["layer"], key)
        checked += 1
    assert checked == 2 * 12  # steps 2 and 4 compare with 1 and 3; 11 tensors and the total


def test_auto_max_entries_rule(monkeypatch):
    """``max_entries='auto'``: every entry below the threshold; above it, the largest cap within 10% of the
    parameters' memory at about 11 bytes per followed float32 entry, said in one info line."""
    from lightning_probes.callbacks import gradient_dynamics
    from lightning_probes.callbacks._entries import auto_max_entries, bytes_per_entry

    rng = np.random.default_rng(0)
    for _ in range(20):
        numels = rng.integers(1, 5000, size=rng.integers(1, 30)).tolist()
        cap = auto_max_entries(numels, itemsize=4)
        budget = 0.1 * 4 * sum(numels)
        assert sum(min(n, cap) for n in numels) * bytes_per_entry(4) <= budget or cap == 1
        if cap < max(numels):
            assert sum(min(n, cap + 1) for n in numels) * bytes_per_entry(4) > budget
    assert (bytes_per_entry(4), bytes_per_entry(2), bytes_per_entry(8)) == (4, 3, 9)  # state byte + compact copy

    model = small_mlp()
    probe = GradientDynamicsMonitor()
    probe._select(model)
    assert probe._selected_counts == [p.numel() for p in model.parameters()]  # small: everything followed
    monkeypatch.setattr(gradient_dynamics, "_AUTO_ABOVE", 100)
    messages = []
    monkeypatch.setattr(gradient_dynamics, "rank_zero_info", messages.append)
    probe._select(model)
    probe._select(model)  # selected again at the start of training: said once
    cap = auto_max_entries([p.numel() for p in model.parameters()], 4)
    assert probe._selected_counts == [min(p.numel(), cap) for p in model.parameters()]
    assert cap < 300 and len(messages) == 1 and f"following at most {cap:,} seeded entries per tensor" in messages[0]


@pytest.mark.parametrize("kwargs, match", [
    ({"max_entries": 0}, "`max_entries` to be a positive integer, None .* or 'auto', but got 0"),
    ({"max_entries": "all"}, "`max_entries`.*but got 'all'"),
    ({"seed": -1}, "`seed` to be a non-negative integer, but got -1"),
])
def test_bad_sampling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientDynamicsMonitor(**kwargs)


def test_logged_steps_stay_device_blocks_until_the_flush(tmp_path):
    """Records of logged steps wait as device blocks and are written at the flush (epoch end here), also those of
    a step whose scalars go to the loggers (made at once, after the blocks before it). Every record once."""
    seen = []

    class Peek(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            path = tmp_path / "gradient_dynamics.jsonl"
            seen.append(sorted({r["step"] for r in read(path)}) if path.exists() else [])

    probe = GradientDynamicsMonitor(every_n_steps=1, flush_every_n_steps=100, flush_secs=None,
                                    output_dir=str(tmp_path))
    trainer(tmp_path, [probe, Peek()], logger=CaptureLogger(), log_every_n_steps=4, max_epochs=1).fit(
        small_mlp(), RandomDataModule())
    assert seen == [[]] * 6  # nothing written before the epoch ends (flush_every_n_steps=100)
    records = read(tmp_path / "gradient_dynamics.jsonl")
    totals = [r for r in records if r["layer"] == "__total__"]
    assert [r["step"] for r in totals] == list(range(6))
    ema = None  # made in step order although steps 0 and 4 (due to the loggers) were made before the others
    for r in totals:
        ema = r["grad_norm"] if ema is None else 0.9 * ema + 0.1 * r["grad_norm"]
        assert r["grad_norm_ema"] == pytest.approx(ema)
