"""The `importance` section of a study's summary: the grid's variance shares recomputed by hand (pandas) from
`trials.csv`, the parallel-coordinates and importance figures, and a sampled study's forest section (the key that
decides the monitor first, the seed and a noise key near zero) with its markdown."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lightning_probes.studies.aggregate import summary_markdown
from lightning_probes.studies.hparams_figures import axis_positions
from lightning_probes.studies.importance import importance_markdown, importance_summary
from lightning_probes.studies.results import TrialResult


def test_grid_study_summary_has_the_variance_shares_of_its_trials(finished_study):
    summary = json.loads((finished_study / "summary.json").read_text())
    section = summary["importance"]
    table = pd.read_csv(finished_study / "trials.csv")
    y = table["val/acc"].to_numpy()
    total = ((y - y.mean()) ** 2).sum()
    level_means = table.groupby("model.init_args.lr")["val/acc"].transform("mean").to_numpy()
    eta2 = ((level_means - y.mean()) ** 2).sum() / total
    assert section["monitor"] == "val/acc" and section["n"] == 4 and section["balanced"]
    assert section["shares"]["model.init_args.lr"] == pytest.approx(eta2)
    assert section["seeds"] == pytest.approx(((y - level_means) ** 2).sum() / total)
    markdown = (finished_study / "summary.md").read_text()
    assert "## What mattered: `val/acc` across 4 finished trials" in markdown
    assert f"| model.init_args.lr | {eta2:.3f} |" in markdown
    for name in ("parallel_coordinates", "importance"):
        assert (finished_study / "figures" / f"{name}.png").stat().st_size > 0, name


def _result(i, lr, activation, noise, seed, val_acc, status="finished"):
    epochs = pd.DataFrame({"val/acc": [val_acc]}, index=pd.Index([0], name="epoch"))
    return TrialResult(f"sample={i:04d}", {"lr": lr, "activation": activation, "noise": noise}, seed, status,
                       epochs=epochs)


def test_sampled_study_gets_the_forest_importance():
    rng = np.random.default_rng(0)
    results = []
    for i in range(60):
        lr, activation, noise = float(10 ** rng.uniform(-3, -1)), str(rng.choice(["relu", "tanh"])), rng.uniform()
        acc = 0.5 + 0.2 * (np.log10(lr) + 3) + rng.normal(0, 0.005)  # lr decides; activation, noise, seed do not
        results.append(_result(i, lr, activation, noise, int(rng.integers(0, 1000)), acc))
    results.append(_result(99, 0.01, "relu", 0.5, 1, float("nan")))  # no finite monitor: left out
    results.append(_result(98, 0.01, "relu", 0.5, 1, 0.9, status="failed"))  # not finished: left out
    section = importance_summary(results, ["lr", "activation", "noise"], "val/acc", sampled=True)
    assert section["n"] == 60 and set(section["keys"]) == {"lr", "activation", "noise", "seed"}
    assert section["keys"][0] == "lr" and section["importance"]["lr"]["mean"] > 0.5
    for key in ("activation", "noise", "seed"):
        assert abs(section["importance"][key]["mean"]) < 0.05, key
    assert section["oob_r2"] > 0.8
    text = "\n".join(importance_markdown(section))
    assert "out-of-bag r2 is" in text and "| lr |" in text
    summary = {"name": "s", "settings": [], "compare": {"metric": "val/acc"}, "monitor": "val/acc", "mode": "max",
               "best": None, "n_finished": 60, "n_trials": 62, "n_failed": 1, "importance": section}
    assert "## What mattered" in summary_markdown(summary)
    assert importance_summary(results[:5], ["lr"], "val/acc", sampled=True) is None  # too few for a forest


def test_parallel_axis_positions():
    positions, ticks, labels = axis_positions([0.001, 0.01, 0.1])  # two decades: a log axis
    assert positions.tolist() == pytest.approx([0.0, 0.5, 1.0]) and labels == ["0.001", "0.01", "0.1"]
    positions, _, labels = axis_positions([1, 2, 4])
    assert positions.tolist() == pytest.approx([0.0, 1 / 3, 1.0])
    rng = np.random.default_rng(0)
    dropout = np.append(rng.uniform(0.0, 0.5, 200), 5e-5)  # uniform, with one draw near 0: a linear axis
    _, _, labels = axis_positions(dropout.tolist())
    assert labels == [f"{v:.3g}" for v in np.linspace(5e-5, dropout.max(), 3)]
    lr = 10 ** rng.uniform(-2, np.log10(0.15), 200)  # log-uniform: a log axis
    positions, _, labels = axis_positions(lr.tolist())
    np.testing.assert_allclose(positions, (np.log10(lr) - np.log10(lr.min())) / np.log10(lr.max() / lr.min()))
    positions, ticks, labels = axis_positions(["tanh", "relu", "tanh"])
    assert positions.tolist() == [1.0, 0.0, 1.0] and labels == ["relu", "tanh"]
