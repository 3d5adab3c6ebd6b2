"""`GradientDynamicsMonitor`'s update-to-weight ratio, update RMS and distance from initialisation, against NumPy
computations from full copies of the weights (`tests.helpers.GradRecorder`)."""

import json

import numpy as np
import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_probes import GradientDynamicsMonitor
from lightning_probes.callbacks._dynamics_step import initial_columns, ratio_columns
from tests.helpers import GradRecorder, RandomDataModule, approx, read, small_mlp, trainer


def _flat(weights, layer, subsets=None):
    def one(name):
        v = weights[name].numpy().ravel()
        return v if subsets is None or subsets[name] is None else v[subsets[name]]
    if layer == "__total__":
        return np.concatenate([one(n) for n in weights])
    return one(layer)


def _copy_error(weights, layer, subsets=None):
    """The documented bound on the error of ``update_norm`` from the compact copy of the weights: a weight below
    ``2**-15`` times its tensor's largest magnitude (over the followed entries) has its exponent decoded from the
    value after the step, off by at most ``2**-14`` times that largest magnitude (docs/probes/gradient_dynamics.md)."""
    names = list(weights) if layer == "__total__" else [layer]
    square = 0.0
    for name in names:
        v = np.abs(_flat(weights, name, subsets).astype(np.float64))
        if v.size:
            square += np.count_nonzero(v < 2.0 ** -15 * v.max()) * (2.0 ** -14 * v.max()) ** 2
    return np.sqrt(square)


def _check(records, steps, w0, subsets=None, init=True):
    checked = 0
    for r in records:
        now = steps[r["step"]]
        before, after = _flat(now["before"], r["layer"], subsets), _flat(now["after"], r["layer"], subsets)
        update = np.linalg.norm(after.astype(np.float64) - before)
        bound = _copy_error(now["before"], r["layer"], subsets)  # 0 unless a followed weight is that small
        norm, size = np.linalg.norm(after.astype(np.float64)), after.size
        assert r["update_ratio"] == approx(update / norm, rel=1e-6, abs=bound / norm), (r["step"], r["layer"])
        assert r["update_rms"] == approx(update / np.sqrt(size), rel=1e-6, abs=bound / np.sqrt(size)), r["layer"]
        if init:
            start = _flat(w0, r["layer"], subsets)
            distance = np.linalg.norm(after - start)
            assert r["init_distance"] == approx(distance, rel=1e-6, abs=1e-12), (r["step"], r["layer"])
            scale = np.linalg.norm(start)  # 0 for a bias initialised to zeros: undefined
            assert r["relative_init_distance"] == (None if scale == 0 else approx(distance / scale, rel=1e-6))
        else:
            assert "init_distance" not in r
        checked += 1
    return checked


def test_ratios_and_initial_distance_match_numpy(tmp_path):
    recorder = GradRecorder()
    probe = GradientDynamicsMonitor(every_n_steps=2, output_dir=str(tmp_path), init_distance=True)
    trainer(tmp_path, [recorder, probe], max_epochs=2).fit(small_mlp(momentum=0.9, lr=0.2), RandomDataModule())
    steps = recorder.by_step()
    records = read(tmp_path / "gradient_dynamics.jsonl")
    assert _check(records, steps, steps[0]["before"]) == 6 * 12  # steps 0, 2, ..., 10; 11 tensors and the total
    assert records[0]["init_distance"] > 0  # the first logged step is after its update
    totals = [r["init_distance"] for r in records if r["layer"] == "__total__"]
    assert totals[-1] > totals[0]
    raw = tmp_path / "gradient_dynamics" / "initial_weights.rank0.bin"
    n = sum(v.numel() for v in steps[0]["before"].values())
    assert raw.stat().st_size == 4 * n  # float32 w_0 on disk, nothing of it kept in memory
    assert json.loads(raw.with_name(raw.name + ".json").read_text())["step"] == 0


def test_without_init_distance_no_file_and_ratio_still_there(tmp_path):
    recorder = GradRecorder()
    probe = GradientDynamicsMonitor(every_n_steps=3, output_dir=str(tmp_path))
    trainer(tmp_path, [recorder, probe], max_epochs=1).fit(small_mlp(lr=0.2), RandomDataModule())
    assert _check(read(tmp_path / "gradient_dynamics.jsonl"), recorder.by_step(), None, init=False) == 2 * 12
    assert not list((tmp_path / "gradient_dynamics").glob("initial_weights*"))


def test_ratios_over_the_followed_subset(tmp_path):
    """With ``max_entries`` the ratio's numerator and denominator are both over the followed entries."""
    from lightning_probes.callbacks._entries import draw_subsets

    recorder = GradRecorder()
    probe = GradientDynamicsMonitor(every_n_steps=2, max_entries=20, seed=3, output_dir=str(tmp_path),
                                    init_distance=True)
    model = small_mlp(momentum=0.9, lr=0.2)
    names = [n for n, _ in model.named_parameters()]
    subsets = dict(zip(names, draw_subsets([p.numel() for p in model.parameters()], 20, 3)))
    subsets = {n: None if s is None else s.astype(np.int64) for n, s in subsets.items()}
    trainer(tmp_path, [recorder, probe], max_epochs=1).fit(model, RandomDataModule())
    steps = recorder.by_step()
    assert _check(read(tmp_path / "gradient_dynamics.jsonl"), steps, steps[0]["before"], subsets) == 3 * 12
    raw = tmp_path / "gradient_dynamics" / "initial_weights.rank0.bin"
    assert raw.stat().st_size == 4 * sum(p.numel() if subsets[n] is None else 20 for n, p in model.named_parameters())


def test_resume_measures_from_the_first_fits_initial_weights(tmp_path):
    """A resumed fit reopens ``w_0`` of the fit it resumes: its records equal the uninterrupted run's."""
    full, out = tmp_path / "full", tmp_path / "out"
    torch.manual_seed(0)
    model = small_mlp(lr=0.2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainer(full, [GradientDynamicsMonitor(every_n_steps=1, output_dir=str(full), init_distance=True)],
            max_epochs=3).fit(model, RandomDataModule())
    model = small_mlp(lr=0.2)
    model.load_state_dict(state)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer(tmp_path, [GradientDynamicsMonitor(every_n_steps=1, output_dir=str(out), init_distance=True), ckpt],
            max_epochs=2, enable_checkpointing=True).fit(model, RandomDataModule())
    ckpt_path = next(p for p in (tmp_path / "ckpt").iterdir() if "epoch=1" in p.name)
    resumed = GradientDynamicsMonitor(every_n_steps=1, output_dir=str(out), init_distance=True)
    trainer(tmp_path, [resumed], max_epochs=3).fit(small_mlp(lr=0.2), RandomDataModule(), ckpt_path=str(ckpt_path))
    a, b = read(full / "gradient_dynamics.jsonl"), read(out / "gradient_dynamics.jsonl")
    assert [(r["step"], r["layer"]) for r in a] == [(r["step"], r["layer"]) for r in b]
    assert resumed._initial.step == 0
    for x, y in zip(a, b):
        for key in ("init_distance", "relative_init_distance", "update_ratio"):
            assert y[key] == approx(x[key], rel=1e-6, abs=1e-12), (x["step"], x["layer"], key)


def test_resume_without_the_file_warns_and_restarts_the_reference(tmp_path):
    out = tmp_path / "out"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer(tmp_path, [GradientDynamicsMonitor(every_n_steps=1, output_dir=str(out), init_distance=True), ckpt],
            max_epochs=1, enable_checkpointing=True).fit(small_mlp(), RandomDataModule())
    for f in (out / "gradient_dynamics").glob("initial_weights*"):
        f.unlink()
    resumed = GradientDynamicsMonitor(every_n_steps=1, output_dir=str(out), init_distance=True)
    ckpt_path = next((tmp_path / "ckpt").iterdir())
    with pytest.warns(UserWarning, match="initial weights of the resumed run"):
        trainer(tmp_path, [resumed], max_epochs=2).fit(small_mlp(), RandomDataModule(), ckpt_path=str(ckpt_path))
    assert resumed._initial.step == 6


def test_column_functions_by_hand():
    c = ratio_columns(np.array([9.0, 0.0]), np.array([0.0, 4.0]), [1, 4], skipped=False)
    assert np.isnan(c["update_ratio"][0]) and c["update_ratio"][1] == 0.0 and c["update_ratio"][2] == 1.5
    assert c["update_rms"].tolist() == [3.0, 0.0, 3.0 / np.sqrt(5)]
    assert np.isnan(ratio_columns(np.ones(2), np.ones(2), [1, 1], skipped=True)["update_ratio"]).all()
    d = initial_columns(np.array([1.0, 3.0]), np.array([4.0, 12.0]))
    assert d["init_distance"].tolist() == [1.0, np.sqrt(3.0), 2.0]
    assert d["relative_init_distance"].tolist() == [0.5, 0.5, 0.5]


def test_init_distance_must_be_a_bool():
    with pytest.raises(ValueError, match="init_distance.*'yes'"):
        GradientDynamicsMonitor(init_distance="yes")
