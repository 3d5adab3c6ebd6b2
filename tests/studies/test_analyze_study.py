"""``lightning-probes analyze`` on a study output (the shared tiny study), through its command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lightning_probes.commands import COMMANDS
from lightning_probes.commands.analyze import main

BASE = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def test_analyze_is_a_command():
    assert COMMANDS["analyze"] == "lightning_probes.commands.analyze"


def test_a_study_output_is_every_finished_trial(finished_study, tmp_path, capsys):
    study = tmp_path / "study"
    shutil.copytree(finished_study, study)
    unfinished = study / "trials" / "lr=0.2-seed=2" / "status.json"
    unfinished.write_text(json.dumps({"status": "running"}))
    out = tmp_path / "out"
    main([str(study), "--output", str(out), "--config", str(BASE), "--num_samples", "64", "--no_progress"])
    printed = capsys.readouterr().out
    results = json.loads((out / "analysis_results.json").read_text())
    trials = ["lr=0.05-seed=1", "lr=0.05-seed=2", "lr=0.2-seed=1"]
    assert list(results["runs"]) == trials
    assert results["skipped"]["runs"][0]["reason"] == "trial not finished (status: running)"
    for trial in trials:
        assert trial in printed
        test_acc = json.loads((study / "trials" / trial / "status.json").read_text())
        assert results["runs"][trial]["test"]["test/acc"] is not None and test_acc["status"] == "finished"
        assert results["calibration"]["per_model"][trial]["n"] == 64
    assert results["similarity"]["pca"]["basis"] == "shared layers"  # one architecture
    assert "report:" in printed and (out / "report.html").is_file() and (out / "summary_dashboard.png").is_file()
    # The headline's test accuracy is the trial's own `lightning test` result (test/metrics.csv).
    import pandas as pd

    frame = pd.read_csv(study / "trials" / trials[0] / "test" / "metrics.csv")
    row = next(r for r in results["headline"] if r["run"] == trials[0])
    assert row["test_acc"] == pytest.approx(frame["test/acc"].dropna().iloc[-1])


def test_names_replace_the_trial_ids(finished_study, tmp_path):
    out = tmp_path / "out"
    main([str(finished_study), "--output", str(out), "--names", "a,b,c,d", "--no_progress"])
    results = json.loads((out / "analysis_results.json").read_text())
    assert list(results["runs"]) == ["a", "b", "c", "d"]
    assert results["data"]["config"] is None and "calibration" in results


@pytest.mark.parametrize(("args", "message"), [
    (["{missing}"], "is not a directory"),
    (["{empty}"], "none of these"),
    (["{study}", "--num_samples", "0"], "`num_samples` to be a positive integer, but got 0"),
    (["{study}", "--names", "a,b"], "`names` to give one name per run found (4"),
    (["{study}", "--config", "{missing}"], "`config` to be a fit config file"),
    (["{study}", "--bogus", "1"], "see lightning-probes analyze --help"),
])
def test_bad_arguments_give_one_error_line(finished_study, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    values = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"), "study": str(finished_study)}
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(**values) for a in args] + ["--output", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()
