"""The study summary's gradient flow: ``summary.json``'s ``gradient_flow`` section against NumPy computed from the
trials' own ``gradient_flow.json``, ``figures/gradient_flow.png`` (and its TensorBoard image), studies without a
``GradientStatsMonitor``, and one real tiny study of two networks with different layers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_probes.studies import PreparedStudy, StudySpec, TrialJob, expand_trials, write_study_summary
from lightning_probes.studies.figures import _merged_order
from lightning_probes.studies.gradient_flow import find_gradient_flow, mean_gradient_flow
from tests.studies.conftest import BASE, write_study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLAIN = ["net.conv1.weight", "net.conv1.bias", "net.conv2.weight", "net.conv2.bias", "net.fc1.weight",
         "net.fc1.bias", "net.fc2.weight", "net.fc2.bias"]
BATCH_NORM = ["net.conv1.weight", "net.bn1.weight", "net.bn1.bias", "net.conv2.weight", "net.bn2.weight",
              "net.bn2.bias", "net.fc1.weight", "net.bn3.weight", "net.bn3.bias", "net.fc2.weight", "net.fc2.bias"]
MODELS = [
    {"class_path": "lightning_probes.models.BaselineNet", "init_args": {"lr": 0.05}},
    {"class_path": "lightning_probes.models.DropoutNet", "init_args": {"lr": 0.05, "dropout": 0.6}},
    {"class_path": "lightning_probes.models.BatchNormNet", "init_args": {"lr": 0.05}},
]
LAYERS = {"BaselineNet": PLAIN, "DropoutNet": PLAIN, "BatchNormNet": BATCH_NORM}


def _study(root: Path, seeds=(1, 2)) -> PreparedStudy:
    """A study over the three networks, its trials not run (their directories are faked by the tests)."""
    spec = StudySpec(name="flow", path=str(root / "flow.yaml"), base=str(BASE), overrides={},
                     grid={"model": MODELS}, seeds=list(seeds), monitor="val/acc", smoothing=2, test=False,
                     output=str(root / "out"))
    trials = expand_trials(spec)
    cwd = root / "cwd"
    cwd.mkdir(exist_ok=True)
    jobs = [TrialJob(t.trial_id, str(root / "out" / "trials" / t.trial_id), dict(t.params), t.seed, False, str(cwd))
            for t in trials]
    return PreparedStudy(spec, trials, jobs, {})


def _fake_trial(trial_dir: Path, status: str = "finished", seed: int = 0) -> None:
    """``status.json`` and a two-epoch ``metrics.csv``, as a finished trial leaves them."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "status.json").write_text(json.dumps({"status": status}))
    rng = np.random.default_rng(seed)
    acc, loss = rng.uniform(0.3, 0.9, 2), rng.uniform(0.5, 2.0, 2)
    rows = ["epoch,step,train/loss,val/acc,val/loss"]
    rows += [f"{e},{10 * (e + 1)},{loss[e] + 0.1},{acc[e]},{loss[e]}" for e in range(2)]
    (trial_dir / "metrics.csv").write_text("\n".join(rows) + "\n")


def _flow(layers: list[str], rng: np.random.Generator, window: int = 5, missing: int = 0) -> dict:
    """A ``gradient_flow.json`` as ``GradientStatsMonitor`` writes it: ``missing`` last-window values are None."""
    def values(scale):
        return [float(v) for v in scale * rng.lognormal(0.0, 1.0, len(layers))]

    flow = {"window": window, "layers": list(layers),
            "first": {"mean": values(1e-2), "std": values(1e-2)},
            "last": {"mean": values(1e-3), "std": values(1e-3)}}
    for i in range(missing):
        flow["last"]["mean"][i] = flow["last"]["std"][i] = None
    return flow


def _write_flow(path: Path, flow: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(flow, indent=2))


def _model(trial) -> str:
    return trial.params["model"]["class_path"].rsplit(".", 1)[-1]


def _expected(flows: list[dict]) -> dict:
    """NumPy: per window and statistic the mean over seeds of each layer (None values left out)."""
    layers = flows[0]["layers"]
    out = {}
    for window in ("first", "last"):
        for stat in ("mean", "std"):
            table = np.array([[np.nan if v is None else v for v in f[window][stat]] for f in flows], dtype=float)
            out[window, stat] = np.nanmean(table, axis=0)
    return {"layers": layers, **out}


def _assert_png(path: Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200


def _summary_images(output: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "summary"), size_guidance={"images": 0}).Reload()
    return events.Tags()["images"]


def test_summary_gradient_flow_matches_numpy_and_is_drawn(tmp_path):
    study = _study(tmp_path)
    rng = np.random.default_rng(0)
    flows: dict[str, list[dict]] = {}
    for k, trial in enumerate(study.trials):
        trial_dir = tmp_path / "out" / "trials" / trial.trial_id
        _fake_trial(trial_dir, seed=k)
        # the DropoutNet trials have a layer without gradients in the last window (None in the file)
        flow = _flow(LAYERS[_model(trial)], rng, missing=1 if _model(trial) == "DropoutNet" and trial.seed == 1 else 0)
        _write_flow(trial_dir / "probes" / "gradient_stats" / "gradient_flow.json", flow)
        flows.setdefault(_model(trial), []).append(flow)
    # a failed trial's file does not count
    failed = study.trials[0]
    (tmp_path / "out" / "trials" / failed.trial_id / "status.json").write_text(json.dumps({"status": "failed"}))
    flows["BaselineNet"] = flows["BaselineNet"][1:]

    returned = write_study_summary(study)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["gradient_flow"] == json.loads(json.dumps(returned["gradient_flow"]))
    section = summary["gradient_flow"]["settings"]
    assert [s["params"]["model"]["class_path"].rsplit(".", 1)[-1] for s in section] == list(LAYERS)
    for setting in section:
        model = setting["params"]["model"]["class_path"].rsplit(".", 1)[-1]
        expected = _expected(flows[model])
        assert setting["n"] == len(flows[model])
        assert setting["seeds"] == ([2] if model == "BaselineNet" else [1, 2])
        assert setting["window"] == 5
        assert setting["layers"] == LAYERS[model] == expected["layers"]
        for window in ("first", "last"):
            for stat in ("mean", "std"):
                assert setting[window][stat] == pytest.approx(list(expected[window, stat]), rel=1e-12)
    # the DropoutNet layer without gradients in one seed's last window is the other seed's value
    dropout = next(s for s in section if "DropoutNet" in s["params"]["model"]["class_path"])
    assert dropout["last"]["mean"][0] == pytest.approx(flows["DropoutNet"][1]["last"]["mean"][0])

    # summary.md: one row per weight tensor (biases left out), "first -> last" per setting, from the numbers above
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "## Gradient flow" in markdown
    rows = {line.split(" | ")[0].lstrip("| "): line for line in markdown.splitlines() if ".weight |" in line}
    weights = [name for model in LAYERS for name in LAYERS[model] if name.endswith("weight")]
    assert set(rows) == set(weights) and not any(".bias |" in line for line in markdown.splitlines())
    for setting in section:
        column = section.index(setting) + 1
        for name in setting["layers"]:
            if name.endswith("weight"):
                i = setting["layers"].index(name)
                cell = rows[name].strip("| ").split(" | ")[column]
                assert cell == f"{setting['first']['mean'][i]:.2e} → {setting['last']['mean'][i]:.2e}"

    _assert_png(tmp_path / "out" / "figures" / "gradient_flow.png")
    for name in ("curves", "smoothed", "test"):
        _assert_png(tmp_path / "out" / "figures" / f"{name}.png")
    assert "study/gradient_flow" in _summary_images(tmp_path / "out")


def test_studies_without_gradient_stats_have_no_gradient_flow(tmp_path, caplog):
    study = _study(tmp_path, seeds=(1,))
    for k, trial in enumerate(study.trials):
        _fake_trial(tmp_path / "out" / "trials" / trial.trial_id, seed=k)
    with caplog.at_level(logging.WARNING):
        summary = write_study_summary(study)
    assert "gradient_flow" not in summary
    assert "gradient_flow" not in json.loads((tmp_path / "out" / "summary.json").read_text())
    figures = tmp_path / "out" / "figures"
    # No gradient-flow figure; the study's own figures, with what mattered across its trials (a grid varies lr).
    assert sorted(p.name for p in figures.iterdir()) == ["curves.png", "importance.png", "parallel_coordinates.png",
                                                         "smoothed.png", "test.png"]
    assert "study/gradient_flow" not in _summary_images(tmp_path / "out")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_unreadable_gradient_flow_is_skipped_with_a_warning(tmp_path, caplog):
    study = _study(tmp_path, seeds=(1,))
    rng = np.random.default_rng(1)
    for k, trial in enumerate(study.trials):
        trial_dir = tmp_path / "out" / "trials" / trial.trial_id
        _fake_trial(trial_dir, seed=k)
        flow = _flow(LAYERS[_model(trial)], rng)
        if _model(trial) == "DropoutNet":
            flow["first"]["std"] = flow["first"]["std"][:-1]  # one value short
        _write_flow(trial_dir / "probes" / "gradient_stats" / "gradient_flow.json", flow)
    with caplog.at_level(logging.WARNING):
        summary = write_study_summary(study)
    assert [s["params"]["model"]["class_path"].rsplit(".", 1)[-1] for s in summary["gradient_flow"]["settings"]] \
        == ["BaselineNet", "BatchNormNet"]
    assert "ignoring the unreadable gradient flow" in caplog.text
    _assert_png(tmp_path / "out" / "figures" / "gradient_flow.png")


def test_probe_name_and_output_dir_come_from_the_trial_config(tmp_path):
    trial_dir = tmp_path / "trial"
    cwd = tmp_path / "cwd"
    wanted = cwd / "elsewhere" / "gs" / "gradient_flow.json"
    config = {"trainer": {"callbacks": [
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
        {"class_path": "lightning_probes.GradientStatsMonitor",
         "init_args": {"every_n_steps": 1, "window": 2, "name": "gs", "output_dir": "elsewhere"}},
    ]}}
    trial_dir.mkdir()
    (trial_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert find_gradient_flow(str(trial_dir), str(cwd)) is None
    _write_flow(trial_dir / "probes" / "other" / "gradient_flow.json", _flow(PLAIN, np.random.default_rng(2)))
    assert find_gradient_flow(str(trial_dir), str(cwd)) == str(trial_dir / "probes" / "other" / "gradient_flow.json")
    _write_flow(wanted, _flow(PLAIN, np.random.default_rng(3)))
    assert find_gradient_flow(str(trial_dir), str(cwd)) == os.path.join(str(cwd), "elsewhere", "gs",
                                                                       "gradient_flow.json")
    # the default: <trial_dir>/probes/gradient_stats
    config["trainer"]["callbacks"][1]["init_args"].update(name=None, output_dir=None)
    (trial_dir / "config.yaml").write_text(yaml.safe_dump(config))
    default = trial_dir / "probes" / "gradient_stats" / "gradient_flow.json"
    _write_flow(default, _flow(PLAIN, np.random.default_rng(4)))
    assert find_gradient_flow(str(trial_dir), str(cwd)) == str(default)


def test_mean_gradient_flow_with_different_layers_and_missing_values():
    a = {"window": 3, "layers": ["a", "b"], "first": {"mean": [1.0, 2.0], "std": [0.1, None]},
         "last": {"mean": [None, 4.0], "std": [None, 0.4]}}
    b = {"window": 3, "layers": ["a", "c"], "first": {"mean": [3.0, 5.0], "std": [0.3, 0.5]},
         "last": {"mean": [None, 6.0], "std": [None, 0.6]}}
    out = mean_gradient_flow([a, b])
    assert out["window"] == 3 and out["layers"] == ["a", "b", "c"]
    # a layer is averaged over the seeds that have it; NaN (null in summary.json) where none has a value
    np.testing.assert_allclose(out["first"]["mean"], [2.0, 2.0, 5.0])
    np.testing.assert_allclose(out["first"]["std"], [0.2, np.nan, 0.5])
    np.testing.assert_allclose(out["last"]["mean"], [np.nan, 4.0, 6.0])
    np.testing.assert_allclose(out["last"]["std"], [np.nan, 0.4, 0.6])
    with pytest.raises(ValueError, match="at least one"):
        mean_gradient_flow([])


def test_merged_layer_order_keeps_each_network_order():
    plain = [n for n in PLAIN if n.endswith("weight")]
    batch_norm = [n for n in BATCH_NORM if n.endswith("weight")]
    assert _merged_order([plain, batch_norm]) == batch_norm
    assert _merged_order([batch_norm, plain]) == batch_norm
    assert _merged_order([["b", "d"], ["a", "b", "c", "d"]]) == ["a", "b", "c", "d"]


def test_real_tiny_study_draws_the_gradient_flow(tmp_path):
    # Two networks with different layers (batch norm), one seed, one short epoch on digits, GradientStatsMonitor
    # attached: every trial leaves gradient_flow.json and the summary draws the comparison from them.
    from lightning_probes.commands.study import study

    overrides = {
        "trainer.max_epochs": 1,
        "trainer.limit_train_batches": 3,
        "trainer.limit_val_batches": 1,
        "trainer.callbacks": [
            {"class_path": "ModelCheckpoint", "init_args": {"save_last": True}},
            {"class_path": "lightning_probes.GradientStatsMonitor", "init_args": {"every_n_steps": 1, "window": 2}},
        ],
    }
    grid = {"model": [
        {"class_path": "lightning_probes.models.BaselineNet",
         "init_args": {"lr": 0.05, "in_channels": 1, "input_size": 28}},
        {"class_path": "lightning_probes.models.BatchNormNet",
         "init_args": {"lr": 0.05, "in_channels": 1, "input_size": 28}},
    ]}
    config = write_study(tmp_path / "flow.yaml", name="flow", overrides=overrides, grid=grid, seeds=[1], test=False)
    output = tmp_path / "out"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert study(str(config), output=str(output), progress=False) == 0
    finally:
        os.chdir(cwd)
    summary = json.loads((output / "summary.json").read_text())
    section = summary["gradient_flow"]["settings"]
    assert len(section) == 2 and all(s["n"] == 1 and s["window"] == 2 for s in section)
    for setting, model in zip(section, ("BaselineNet", "BatchNormNet")):
        assert setting["params"]["model"]["class_path"].endswith(model)
        [trial_dir] = (output / "trials").glob(f"model={model}+*-seed=1")
        flow = json.loads((trial_dir / "probes" / "gradient_stats" / "gradient_flow.json").read_text())
        assert setting["layers"] == flow["layers"]
        for window in ("first", "last"):
            for stat in ("mean", "std"):
                assert setting[window][stat] == pytest.approx(flow[window][stat])
    assert any("bn1" in name for name in section[1]["layers"])
    assert not any("bn1" in name for name in section[0]["layers"])
    _assert_png(output / "figures" / "gradient_flow.png")
    assert "study/gradient_flow" in _summary_images(output)
