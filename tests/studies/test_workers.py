"""Long-lived trial workers (`lightning-probes study --workers N`): a worker runs trial after trial in-process with
the results of fresh processes; a trial that kills its worker or raises is marked failed with its reason and the
study goes on; a rerun resumes the killed trial from its checkpoint; bad input is one `error:` line."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lightning_probes import read_probes
from lightning_probes.commands.study import main, study
from lightning_probes.reading import read_epoch_metrics
from lightning_probes.studies import prepare_study, run_sequential, workers
from lightning_probes.studies.runner import check_ray_address
from lightning_probes.studies.trial_config import config_digest
from tests.studies.conftest import OVERRIDES, write_study

CHECKPOINT = {"class_path": "ModelCheckpoint", "init_args": {"save_last": True}}


def _worker_pid(trial_dir: Path) -> int:
    match = re.search(r"in a long-lived worker, pid (\d+)", (trial_dir / "fit.log").read_text())
    assert match, (trial_dir / "fit.log").read_text()[-2000:]
    return int(match.group(1))


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    drop = [c for c in frame.columns if c in ("time", "wall_time", "timestamp") or c.endswith("_s")]
    return frame.drop(columns=drop).select_dtypes("number")


def _listing(trial_dir: Path) -> list[str]:
    """The trial's files, event files by kind (their names hold a time stamp and a pid)."""
    names = [str(p.relative_to(trial_dir)) for p in trial_dir.rglob("*") if p.is_file()]
    return sorted(re.sub(r"events\.out\.tfevents\.\d+\.[^/]*?\.\d+\.\d+", "events", n) for n in names)


def test_trial_after_another_in_one_worker_equals_a_fresh_process(tmp_path, monkeypatch):
    """Two different trials run one after the other in ONE worker: the second gives exactly what it gives in its own
    `lightning fit` and `lightning test` processes (`--isolate`): epoch and step metrics, test metrics, every probe
    record, the same files."""
    overrides = {**OVERRIDES, "trainer.callbacks": [
        CHECKPOINT,
        {"class_path": "lightning_probes.GradientStatsMonitor", "init_args": {"every_n_steps": 1}},
        {"class_path": "lightning_probes.ConfidenceMonitor", "init_args": {"plot_every_n_epochs": 0}}]}
    config = write_study(tmp_path / "eq.yaml", grid={"model.init_args.lr": [0.3, 0.05]}, seeds=[3],
                         overrides=overrides)
    monkeypatch.chdir(tmp_path)
    in_worker = prepare_study(str(config), output=str(tmp_path / "worker"))
    fresh = prepare_study(str(config), output=str(tmp_path / "fresh"))
    assert [s["status"] for s in run_sequential(in_worker.jobs, progress=False, workers=1)] == ["finished"] * 2
    assert run_sequential(fresh.jobs[1:], progress=False, isolate=True)[0]["status"] == "finished"
    first, second = (tmp_path / "worker" / "trials" / job.trial_id for job in in_worker.jobs)
    assert _worker_pid(first) == _worker_pid(second)  # both trials in one process, the second after the first
    a, b = second, tmp_path / "fresh" / "trials" / second.name
    assert "in a long-lived worker" not in (b / "fit.log").read_text()
    for name in ("metrics.csv", "test/metrics.csv"):
        left, right = pd.read_csv(a / name), pd.read_csv(b / name)
        assert list(left.columns) == list(right.columns) and len(left) == len(right) > 0, name
        np.testing.assert_allclose(_numeric(left).to_numpy(float), _numeric(right).to_numpy(float),
                                   rtol=1e-6, atol=1e-7, err_msg=name)
    for probe in ("gradient_stats", "confidence"):
        left, right = read_probes(str(a), probe=probe), read_probes(str(b), probe=probe)
        assert len(left) == len(right) > 0, probe
        pd.testing.assert_frame_equal(_numeric(left).reset_index(drop=True), _numeric(right).reset_index(drop=True),
                                      check_exact=False, rtol=1e-6, atol=1e-7)
    assert _listing(a) == _listing(b)
    for trial in (a, b):  # the test run saves its config in test/: the trial's config.yaml stays the fit config
        status = json.loads((trial / "status.json").read_text())
        assert config_digest(yaml.safe_load((trial / "config.yaml").read_text())) == status["config_digest"]
        assert "verbose" in yaml.safe_load((trial / "test" / "config.yaml").read_text())


def test_killed_and_raising_trials_fail_with_their_reason_and_resume(tmp_path, monkeypatch):
    """Seed 1 SIGKILLs its worker in epoch 1, seed 2 raises: both are marked failed with the reason, the worker is
    replaced and seed 3 finishes; the rerun resumes seed 1 from its epoch-0 checkpoint (every epoch once)."""
    marker = tmp_path / "killed"
    overrides = {**OVERRIDES, "trainer.callbacks": [
        CHECKPOINT,
        {"class_path": "tests.studies.faults.Fault", "init_args": {"marker": str(marker), "kill_seed": 1,
                                                                   "raise_seed": 2}}]}
    config = write_study(tmp_path / "faults.yaml", grid={"model.init_args.lr": [0.05]}, seeds=[1, 2, 3],
                         overrides=overrides, test=False)
    output = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    assert study(str(config), output=str(output), progress=False, workers=1) == 1
    killed, raised, fine = (output / "trials" / f"lr=0.05-seed={s}" for s in (1, 2, 3))
    status = json.loads((killed / "status.json").read_text())
    assert status["status"] == "failed" and "SIGKILL" in status["error"] and status["returncode"] == -9
    assert "SIGKILL" in (killed / "fit.log").read_text()
    assert (killed / "checkpoints" / "last.ckpt").exists() and int(marker.read_text()) == _worker_pid(killed)
    status = json.loads((raised / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == "RuntimeError: boom from the trial's own code"
    log = (raised / "fit.log").read_text()
    assert "Traceback (most recent call last)" in log and "on_train_epoch_start" in log
    assert json.loads((fine / "status.json").read_text())["status"] == "finished"
    assert _worker_pid(raised) == _worker_pid(fine) != _worker_pid(killed)  # replaced once, then reused
    table = pd.read_csv(output / "trials.csv").set_index("trial_id")
    assert list(table["status"]) == ["failed", "failed", "finished"]
    assert "SIGKILL" in table.loc["lr=0.05-seed=1", "error"]
    assert table.loc["lr=0.05-seed=2", "error"] == "RuntimeError: boom from the trial's own code"

    assert study(str(config), output=str(output), progress=False, workers=1) == 1  # seed 2 raises again
    status = json.loads((killed / "status.json").read_text())
    assert status["status"] == "finished" and status["resumed"]
    epochs = read_epoch_metrics(str(killed))
    assert list(epochs.index) == [0, 1] and epochs["val/acc"].notna().all()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "0"], r"Expected `workers` to be a positive integer .* but got 0"),
    (["--address", "127.0.0.1:6379"], r"`address` \('127.0.0.1:6379'\) joins a Ray cluster: it needs `--engine ray`"),
    (["--engine", "ray", "--workers", "3"], r"`workers` \(3\) sets the sequential engine's .* `--max_concurrent`"),
])
def test_bad_worker_arguments_give_one_error_line(tmp_path, capsys, args, message):
    config = write_study(tmp_path / "tiny.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(config), "--output", str(tmp_path / "out"), "--no_progress", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_unreachable_ray_address_fails_before_any_trial(tmp_path, capsys):
    port = _free_port()
    with pytest.raises(ConnectionError, match=rf"Expected `address` '127.0.0.1:{port}' to be a running Ray cluster"):
        check_ray_address(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(ConnectionError, match="Expected `address` to be `host:port`"):
        check_ray_address("localhost")
    pytest.importorskip("ray.tune")
    config = write_study(tmp_path / "tiny.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(config), "--output", str(tmp_path / "out"), "--engine", "ray",
              "--address", f"127.0.0.1:{port}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot be reached" in err, err
    assert not list((tmp_path / "out" / "trials").glob("*/fit.log"))


def test_worker_that_cannot_start_fails_before_any_trial(tmp_path, capsys, monkeypatch):
    with pytest.raises(workers.WorkerStartError, match="No module named 'lightning_probes_no_such_module'"):
        workers.TrialWorkers(1, preload=("lightning_probes_no_such_module",)).start()
    monkeypatch.setattr(workers, "DEFAULT_PRELOAD", ("lightning_probes_no_such_module",))
    config = write_study(tmp_path / "tiny.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(config), "--output", str(tmp_path / "out"), "--no_progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err == ("error: a trial worker could not start: ModuleNotFoundError: No module named "
                   "'lightning_probes_no_such_module'"), err
    assert not list((tmp_path / "out" / "trials").glob("*/fit.log"))
    with pytest.raises(ValueError, match="Expected `workers` to be a positive integer"):
        workers.TrialWorkers(0)


def test_workers_share_the_cpus_out_as_torch_threads(monkeypatch):
    """N workers of torch's default thread count would oversubscribe the machine N-fold: each worker gets the CPUs
    divided by N (at least 1), unless OMP_NUM_THREADS says otherwise; the worker really runs with that many."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    assert workers.threads_per_worker(1) == cpus
    assert workers.threads_per_worker(cpus) == 1
    assert workers.threads_per_worker(4 * cpus) == 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert workers.TrialWorkers(2).threads == max(1, cpus // 2)
    assert workers.TrialWorkers(2, threads=3).threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert workers.TrialWorkers(2).threads is None
    with pytest.raises(ValueError, match="Expected `threads` to be a positive integer or None, but got 0"):
        workers.TrialWorkers(1, threads=0)
    monkeypatch.delenv("OMP_NUM_THREADS")
    with workers.TrialWorkers(1, preload=("torch",), threads=1) as pool:
        worker = pool._workers[0]
        worker.conn.send(_ThreadsJob())
        kind, status, _ = worker.conn.recv()
    assert kind == "done" and status["status"] == "failed" and "threads=1" in status["error"], status


class _ThreadsJob:
    """A job whose `run_trial` fails with the worker's torch thread count in its message (read back by the test)."""

    trial_id, params, seed = "threads", {}, 0

    @property
    def trial_dir(self):
        import torch

        raise RuntimeError(f"threads={torch.get_num_threads()}")
