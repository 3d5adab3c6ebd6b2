"""`--engine ray` runs the same trials as Ray Tune trials and writes the same files (skipped without Ray)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lightning_probes.commands.study import study
from tests.studies.conftest import write_study

pytest.importorskip("ray.tune")


def test_ray_engine_matches_sequential(finished_study, tmp_path, monkeypatch):
    config = write_study(tmp_path / "ray.yaml", grid={"model.init_args.lr": [0.05]}, seeds=[1, 2], test=False)
    output = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    assert study(str(config), engine="ray", max_concurrent=2, num_cpus=2, output=str(output), progress=False) == 0
    ids = ["lr=0.05-seed=1", "lr=0.05-seed=2"]
    assert sorted(p.name for p in (output / "trials").iterdir()) == ids
    ray_table = pd.read_csv(output / "trials.csv").set_index("trial_id")
    seq_table = pd.read_csv(finished_study / "trials.csv").set_index("trial_id")
    for trial_id in ids:
        assert json.loads((output / "trials" / trial_id / "status.json").read_text())["status"] == "finished"
        assert (output / "trials" / trial_id / "metrics.csv").exists()
        for metric in ("train/loss", "val/loss", "val/acc"):
            assert ray_table.loc[trial_id, metric] == pytest.approx(seq_table.loc[trial_id, metric], abs=0.02)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["n_finished"] == 2 and summary["settings"][0]["n"] == 2
