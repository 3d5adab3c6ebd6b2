"""`lightning-probes study` end to end on tiny digits runs: the summary's statistics against NumPy/SciPy computed
from the trials' own `metrics.csv`, rerun and resume, failed trials, dry runs and bad study files."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lightning_probes.commands.study import main, study
from lightning_probes.studies import prepare_study, runner
from tests.studies.conftest import write_study

IDS = ["lr=0.05-seed=1", "lr=0.05-seed=2", "lr=0.2-seed=1", "lr=0.2-seed=2"]


def _final(trial_dir, metric):
    frame = pd.read_csv(trial_dir / "metrics.csv")
    return float(frame[metric].dropna().iloc[-1])


def _test(trial_dir, metric):
    frame = pd.read_csv(trial_dir / "test" / "metrics.csv")
    return float(frame[metric].dropna().iloc[-1])


def test_trials_and_files(finished_study):
    trials = finished_study / "trials"
    assert sorted(p.name for p in trials.iterdir()) == sorted(IDS)
    for trial_id in IDS:
        trial = trials / trial_id
        assert json.loads((trial / "status.json").read_text())["status"] == "finished"
        assert (trial / "config.yaml").exists() and (trial / "checkpoints" / "last.ckpt").exists()
        assert list(trial.glob("events.out.tfevents.*")), "no TensorBoard events"
        assert list(trial.glob("*.hparams")), "no hparams session"
    for name in ("trials.csv", "summary.json", "summary.md", "figures/curves.png", "figures/smoothed.png",
                 "figures/test.png"):
        assert (finished_study / name).stat().st_size > 0, name
    assert list((finished_study / "summary").glob("events.out.tfevents.*"))
    table = pd.read_csv(finished_study / "trials.csv")
    assert list(table.columns[:4]) == ["trial_id", "seed", "model.init_args.lr", "status"]
    assert set(table["status"]) == {"finished"}
    assert {"train/loss", "val/acc", "val/loss", "test/acc", "test/loss"} <= set(table.columns)
    row = table.set_index("trial_id").loc["lr=0.2-seed=2"]
    assert row["val/acc"] == pytest.approx(_final(trials / "lr=0.2-seed=2", "val/acc"))
    assert row["test/acc"] == pytest.approx(_test(trials / "lr=0.2-seed=2", "test/acc"))


def test_summary_statistics_match_numpy_scipy(finished_study):
    summary = json.loads((finished_study / "summary.json").read_text())
    trials = finished_study / "trials"
    assert summary["monitor"] == "val/acc" and summary["mode"] == "max"
    by_lr = {s["params"]["model.init_args.lr"]: s for s in summary["settings"]}
    assert set(by_lr) == {0.05, 0.2}
    finals, tests = {}, {}
    for lr, setting in by_lr.items():
        assert setting["n"] == 2
        dirs = [trials / f"lr={lr}-seed={seed}" for seed in (1, 2)]
        for metric in ("val/acc", "val/loss", "train/loss"):
            values = [_final(d, metric) for d in dirs]
            got = setting["final"][metric]
            assert got["mean"] == pytest.approx(np.mean(values))
            assert got["std"] == pytest.approx(np.std(values, ddof=1))
            ci = stats.t.interval(0.95, 1, loc=np.mean(values), scale=stats.sem(values))
            assert got["ci95"] == pytest.approx(list(ci))
        finals[lr] = [_final(d, "val/acc") for d in dirs]
        for metric in ("test/acc", "test/loss"):
            values = [_test(d, metric) for d in dirs]
            got = setting["test"][metric]
            assert got["mean"] == pytest.approx(np.mean(values))
            assert got["std"] == pytest.approx(np.std(values, ddof=1))
            assert got["ci95"] == pytest.approx(list(stats.t.interval(0.95, 1, loc=np.mean(values),
                                                                      scale=stats.sem(values))))
        tests[lr] = [_test(d, "test/acc") for d in dirs]
        # per-epoch curves: one value per epoch and seed, from the epoch rows of metrics.csv
        curves = [pd.read_csv(d / "metrics.csv").dropna(subset=["val/loss"])["val/loss"].to_numpy() for d in dirs]
        assert setting["epochs"]["val/loss"]["mean"] == pytest.approx(np.mean(curves, axis=0).tolist())
        assert setting["epochs"]["val/loss"]["std"] == pytest.approx(np.std(curves, axis=0, ddof=1).tolist())
    best = max(finals, key=lambda lr: np.mean(finals[lr]))
    assert summary["best"] == {"model.init_args.lr": best}
    other = next(lr for lr in finals if lr != best)
    assert by_lr[best]["best"] and by_lr[best]["welch"]["p_value"] is None  # NaN -> null
    ref = stats.ttest_ind(tests[best], tests[other], equal_var=False)
    welch = by_lr[other]["welch"]
    assert welch["metric"] == "test/acc"
    if math.isnan(ref.pvalue):
        assert welch["p_value"] is None
    else:
        assert welch["p_value"] == pytest.approx(ref.pvalue)
    markdown = (finished_study / "summary.md").read_text()
    assert f"lr={best} | 2 |" in markdown and "| best |" in markdown


def _summary_files(output: Path) -> dict[str, bytes]:
    """The summary a study writes from its trials' files (not its TensorBoard run, one events file per write)."""
    paths = [output / "trials.csv", output / "summary.json", output / "summary.md", *output.glob("figures/*.png")]
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(paths)}


@pytest.mark.parametrize(("engine", "isolate"), [("sequential", False), ("sequential", True), ("ray", False)])
def test_rerun_of_a_finished_study_only_checks_and_rewrites_the_summary(finished_study, monkeypatch, engine,
                                                                        isolate):
    """A rerun of a finished study starts no worker process, no Ray and no Trainer, and runs no trial: it only
    resolves the configs, reads the trials' files and writes the same summary as the first run, byte for byte."""
    import pytorch_lightning.trainer.trainer as trainer_module

    from lightning_probes.studies import workers

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"a rerun of a finished study {what}: {args}")
        return fail

    monkeypatch.setattr(workers, "_Worker", forbidden("started a trial worker"))
    monkeypatch.setattr(runner, "_run", forbidden("ran a trial"))
    # Not `subprocess.run` itself (the runner's only use of it is inside `_run`): the config parser calls it while
    # it resolves a logger's keyword arguments, and caches the failure for every later test of this process.
    # Every Trainer builds an _AcceleratorConnector; `Trainer.__init__` itself is left alone, since the config
    # parser reads its signature.
    monkeypatch.setattr(trainer_module, "_AcceleratorConnector", forbidden("built a Trainer"))
    if engine == "ray":
        ray = pytest.importorskip("ray")
        pytest.importorskip("ray.tune")
        monkeypatch.setattr(ray, "init", forbidden("started Ray"))
    trials = finished_study / "trials"
    before = {p: p.stat().st_mtime_ns for p in (*trials.glob("*/metrics.csv"), *trials.glob("*/status.json"))}
    first = _summary_files(finished_study)
    assert len(first) >= 6 and any(name.startswith("figures") for name in first)
    monkeypatch.chdir(finished_study.parent)
    assert study(str(finished_study.parent / "tiny.yaml"), output=str(finished_study), engine=engine,
                 isolate=isolate, progress=False) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert _summary_files(finished_study) == first
    assert json.loads((finished_study / "summary.json").read_text())["n_finished"] == 4


def test_failed_trial_and_resume_from_last_checkpoint(finished_study, tmp_path, monkeypatch, capsys):
    # lr=0.05-seed=1 stopped before writing status.json (say Ctrl-C): it restarts from its last.ckpt;
    # lr=-1 is rejected by the model's constructor: that trial fails, the other still finishes.
    output = tmp_path / "out"
    shutil.copytree(finished_study / "trials" / "lr=0.05-seed=1", output / "trials" / "lr=0.05-seed=1")
    (output / "trials" / "lr=0.05-seed=1" / "status.json").unlink()
    config = write_study(tmp_path / "fail.yaml", grid={"model.init_args.lr": [0.05, -1]}, seeds=[1], test=False)
    monkeypatch.chdir(tmp_path)
    assert study(str(config), output=str(output), progress=False) == 1
    resumed = json.loads((output / "trials" / "lr=0.05-seed=1" / "status.json").read_text())
    assert resumed["status"] == "finished" and resumed["resumed"]
    assert (output / "trials" / "lr=0.05-seed=1" / "metrics.part0.csv").exists()
    failed = json.loads((output / "trials" / "lr=-1-seed=1" / "status.json").read_text())
    assert failed["status"] == "failed"
    assert "Expected `lr` to be a positive float" in failed["error"]
    table = pd.read_csv(output / "trials.csv").set_index("trial_id")
    assert table.loc["lr=-1-seed=1", "status"] == "failed"
    assert table.loc["lr=0.05-seed=1", "epochs"] == 2  # the epochs of both attempts, each once
    summary = json.loads((output / "summary.json").read_text())
    assert summary["n_failed"] == 1 and summary["best"] == {"model.init_args.lr": 0.05}


def test_dry_run_lists_trials(tmp_path, capsys):
    config = write_study(tmp_path / "tiny.yaml")
    main(["--config", str(config), "--output", str(tmp_path / "out"), "--dry_run"])
    out = capsys.readouterr().out
    assert all(trial_id in out for trial_id in IDS)
    assert not (tmp_path / "out").exists()


STUDIES = sorted(p.name for p in (Path(__file__).parents[2] / "configs" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("name", STUDIES)
def test_shipped_study_files_resolve(name, tmp_path):
    """Every shipped study file loads, and every one of its trials resolves to a config the `fit` parser takes."""
    from lightning_probes.studies.spec import load_study

    path = Path(__file__).parents[2] / "configs" / "studies" / name
    spec = load_study(str(path))
    # A sampled study's draws all come from the same validated distributions: its first 20 are enough (the zoo's
    # 1,000 would take minutes to resolve).
    num_samples = min(spec.num_samples, 20) if spec.sample else None
    prepared = prepare_study(str(path), output=str(tmp_path / "out"), write=False, num_samples=num_samples)
    assert len(prepared.trials) == len(prepared.jobs) > 1
    assert len({job.trial_id for job in prepared.jobs}) == len(prepared.jobs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("fields", "message"), [
    ({"grid": {"model.init_args.lrr": [0.1]}},
     r"unknown key `model.init_args.lrr` in `grid`; did you mean `model.init_args.lr`"),
    ({"overrides": {"trainer.max_epoch": 2}}, r"unknown key `trainer.max_epoch` in `overrides`; did you mean "
                                              r"`trainer.max_epochs`"),
    ({"grid": {}}, r"`grid` is empty"),
    ({"grid": {"model.init_args.lr": []}}, r"`grid` key `model.init_args.lr` needs a non-empty list"),
    ({"base": "missing.yaml"}, r"`base` 'missing.yaml' does not exist"),
    ({"base": None}, r"missing `base`"),
    ({"seed": [1]}, r"unknown key `seed` \(did you mean `seeds`\?\)"),
    ({"overrides": {"trainer.logger": False}}, r"may not set 'trainer.logger'"),
    ({"mode": "maximum"}, r"expected `mode` to be 'max' or 'min'"),
])
def test_bad_study_file_gives_one_message(tmp_path, capsys, fields, message):
    config = write_study(tmp_path / "bad.yaml", **fields)
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(config), "--output", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("error: study file ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_kill_9_mid_study_then_rerun_keeps_every_epoch_once(tmp_path):
    """A real crash: `kill -9` the study and its running trial in epoch 2, rerun the command, and every epoch's
    validation row is there once (the killed attempt's rows up to its checkpoint included)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lightning_probes.reading import read_epoch_metrics

    root = Path(__file__).resolve().parents[2]
    overrides = {**__import__("tests.studies.conftest", fromlist=["OVERRIDES"]).OVERRIDES,
                 "trainer.max_epochs": 3,
                 "trainer.callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"save_last": True}},
                                       {"class_path": "tests.crash.PauseAt"}]}
    config = write_study(tmp_path / "crash.yaml", grid={"model.init_args.lr": [0.05]}, seeds=[1], test=False,
                         overrides=overrides)
    output = tmp_path / "out"
    marker = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "LP_PAUSE_AT": "2:1", "LP_PAUSE_MARKER": str(marker), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "lightning_probes.cli", "study", "--config", str(config), "--output", str(output),
               "--no_progress"]
    with open(tmp_path / "study.log", "wb") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while not marker.exists():
                assert proc.poll() is None, (tmp_path / "study.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the trial never reached the pause point"
                time.sleep(0.2)
            trial_pid = int(marker.read_text())
            os.kill(proc.pid, signal.SIGKILL)  # the study first, then its trial: as a machine crash would
            os.kill(trial_pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    trial = output / "trials" / "lr=0.05-seed=1"
    assert not (trial / "status.json").exists()
    assert (trial / "checkpoints" / "last.ckpt").exists()
    # The killed attempt wrote its epochs 0 and 1 (the checkpoint is from epoch 1) to its CSV before dying.
    assert sorted(read_epoch_metrics(str(trial))["val/acc"].dropna().index) == [0, 1]

    env.pop("LP_PAUSE_AT")
    subprocess.run(command, cwd=tmp_path, env=env, check=True, timeout=300, capture_output=True)
    status = json.loads((trial / "status.json").read_text())
    assert status["status"] == "finished" and status["resumed"]
    epochs = read_epoch_metrics(str(trial))
    assert list(epochs.index) == [0, 1, 2] and epochs["val/acc"].notna().all()
    assert pd.read_csv(output / "trials.csv").set_index("trial_id").loc["lr=0.05-seed=1", "epochs"] == 3
