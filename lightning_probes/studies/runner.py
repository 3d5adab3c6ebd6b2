"""Running the trials of a study: one trial (``run_trial``: ``fit``, then ``test``), and the Ray engine.

A trial runs either in the current process (``in_process=True``: a long-lived worker of
``lightning_probes.studies.workers`` or a Ray actor, through ``lightning_probes.studies.in_process``) or as
``lightning fit``/``lightning test`` subprocesses (``--isolate``); either way it writes the same files into
``<output>/trials/<trial_id>/``:

- ``config.yaml``: the resolved config (written before the trial starts);
- TensorBoard events, ``metrics.csv`` (``CSVLogger``), ``probes/``, ``checkpoints/last.ckpt``;
- ``test/`` when the study tests: the test run's ``metrics.csv``, TensorBoard events and its own ``config.yaml``
  (the test run's log directory, so that ``config.yaml`` of the trial stays the ``fit`` config a rerun resumes);
- ``fit.log`` / ``test.log``: the runs' output (a traceback when the trial's code raised);
- ``status.json``, written atomically when the trial ends: ``finished`` or ``failed`` (with the error), its wall
  time ``wall_s`` and CPU time ``cpu_s`` (user + system, every thread of its process(es)).

A trial whose ``status.json`` says ``finished`` is skipped; any other restarts, from ``checkpoints/last.ckpt`` if
there is one (the previous ``metrics.csv`` is kept as ``metrics.part<k>.csv``, which
``lightning_probes.reading`` reads back in order). A finished trial's grid values and final metrics are also
written as TensorBoard hparams (``log_trial_hparams``).

Engines: ``sequential`` (``lightning_probes.studies.workers.run_sequential``) runs the trials in long-lived local
workers; ``ray`` (``run_ray``) runs them as Ray Tune trials (``tune.Tuner`` over a function trainable that calls
``run_trial`` in the Ray worker), ``max_concurrent`` at a time, locally or on a cluster.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from lightning_probes.io import atomic_write_json
from lightning_probes.reading import final_values, read_epoch_metrics, read_test_metrics
from lightning_probes.studies.trial_config import trial_loggers
from lightning_probes.studies.trials import scalar_value

log = logging.getLogger(__name__)

__all__ = ["TrialJob", "is_finished", "log_trial_hparams", "read_status", "run_ray", "run_trial"]

STATUS_FILE = "status.json"
FINISHED, FAILED = "finished", "failed"


@dataclass(frozen=True)
class TrialJob:
    """Everything a worker needs to run one trial (plain data: it is sent to Ray workers).

    Args:
        trial_id: The trial's name.
        trial_dir: Its directory (absolute), holding ``config.yaml``.
        params: Grid key -> value.
        seed: Its seed.
        test: Also run ``test`` on the last checkpoint.
        cwd: Working directory of the subprocesses (where the study was started: relative data paths).
        python: The Python interpreter to run ``lightning_probes.cli`` with.
        config_digest: Hash of the resolved config, kept in ``status.json``.
    """

    trial_id: str
    trial_dir: str
    params: dict
    seed: int
    test: bool
    cwd: str
    python: str = sys.executable
    config_digest: str = ""

    def cli_prefix(self) -> list[str]:
        """The command that starts ``lightning`` in a subprocess: ``[python, "-m", "lightning_probes.cli"]``."""
        return [self.python, "-m", "lightning_probes.cli"]


def read_status(trial_dir: str) -> Optional[dict[str, Any]]:
    """The trial's ``status.json``, or ``None`` if it never ended (or the file is unreadable)."""
    try:
        with open(os.path.join(trial_dir, STATUS_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def is_finished(trial_dir: str) -> bool:
    """Whether the trial's ``status.json`` says ``finished``."""
    status = read_status(trial_dir)
    return bool(status) and status.get("status") == FINISHED


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:]).strip()
    except OSError:
        return ""


def _error_line(log_path: str) -> str:
    """The most telling line of a failed run's log: the last ``...Error: ...`` / ``error: ...`` line."""
    tail = _tail(log_path, 60).splitlines()
    for line in reversed(tail):
        stripped = line.strip()
        if stripped.startswith("error:") or (":" in stripped and stripped.split(":", 1)[0].endswith(("Error",
                                                                                                     "Exception"))):
            return stripped
    return tail[-1].strip() if tail else "no output"


def _run(job: TrialJob, args: list[str], log_name: str, in_process: bool = False) -> int:
    log_path = os.path.join(job.trial_dir, log_name)
    if in_process:
        from lightning_probes.studies.in_process import run_cli_in_process

        return run_cli_in_process(args[len(job.cli_prefix()):], log_path, job.cwd)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("LIGHTNING_PROBES_DEBUG", None)
    with open(log_path, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        return subprocess.run(args, cwd=job.cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode


def _rotate_metrics(trial_dir: str) -> None:
    """Keep a crashed run's ``metrics.csv`` as ``metrics.part<k>.csv``: ``CSVLogger`` deletes it on restart."""
    current = os.path.join(trial_dir, "metrics.csv")
    if os.path.isfile(current):
        k = len(glob.glob(os.path.join(trial_dir, "metrics.part*.csv")))
        os.replace(current, os.path.join(trial_dir, f"metrics.part{k}.csv"))


def _cpu_seconds(in_process: bool) -> float:
    """CPU seconds (user + system) of this process (a trial in-process) or of its ended children (subprocesses)."""
    import resource

    if in_process:
        return time.process_time()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def log_trial_hparams(trial_dir: str, params: Mapping[str, Any], seed: int) -> None:
    """Write the trial's grid values and seed with its final metrics as TensorBoard hparams (HPARAMS tab).

    The session is written into the trial's own run (``trial_dir``), next to Lightning's scalars, so TensorBoard
    shows each metric's last logged value in the table.
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    metrics = {**final_values(read_epoch_metrics(trial_dir)), **read_test_metrics(trial_dir)}
    if not metrics:
        return
    hparam_dict = {k: scalar_value(v) for k, v in params.items()}
    hparam_dict["seed"] = seed
    exp, ssi, sei = hparams(hparam_dict, metrics)
    writer = SummaryWriter(log_dir=trial_dir, filename_suffix=".hparams")
    try:
        file_writer = writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
    finally:
        writer.close()


def run_trial(job: TrialJob, in_process: bool = False) -> dict[str, Any]:
    """Run one trial to its end (skipped if already finished) and write its ``status.json``.

    ``fit`` runs as ``python -m lightning_probes.cli fit --config <trial_dir>/config.yaml`` (with ``--ckpt_path
    last.ckpt`` when a previous attempt left one); ``test`` (if asked) on the last checkpoint, logging into
    ``test/``. A non-zero exit of either marks the trial ``failed``; the error line of its log is kept.

    Args:
        job: The trial.
        in_process: Run ``fit`` and ``test`` in this process (``lightning_probes.studies.in_process``: a long-lived
            worker) instead of one subprocess each; the same files either way.

    Returns:
        The trial's status (as written to ``status.json``).
    """
    previous = read_status(job.trial_dir)
    if previous and previous.get("status") == FINISHED:
        return {**previous, "skipped": True}
    started, cpu_started = time.time(), _cpu_seconds(in_process)
    config = os.path.join(job.trial_dir, "config.yaml")
    last = os.path.join(job.trial_dir, "checkpoints", "last.ckpt")
    cli = job.cli_prefix()
    fit = [*cli, "fit", "--config", config]
    resumed = os.path.isfile(last)
    if resumed:
        _rotate_metrics(job.trial_dir)
        fit += ["--ckpt_path", last]
    status: dict[str, Any] = {"trial_id": job.trial_id, "params": job.params, "seed": job.seed,
                              "config_digest": job.config_digest, "resumed": resumed}
    code = _run(job, fit, "fit.log", in_process)
    if code == 0 and job.test:
        if not os.path.isfile(last):
            code, status["error"] = -1, f"no {last} to test"
        else:
            test_dir = os.path.join(job.trial_dir, "test")
            _rotate_metrics(test_dir)
            test = [*cli, "test", "--config", config, "--ckpt_path", last,
                    "--trainer.logger", json.dumps(trial_loggers(test_dir))]
            code = _run(job, test, "test.log", in_process)
            if code != 0:
                status["error"] = _error_line(os.path.join(job.trial_dir, "test.log"))
    elif code != 0:
        status["error"] = _error_line(os.path.join(job.trial_dir, "fit.log"))
    status.update(status=FINISHED if code == 0 else FAILED, returncode=code, wall_s=round(time.time() - started, 2),
                  cpu_s=round(_cpu_seconds(in_process) - cpu_started, 2), ended=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if code == 0:
        try:
            log_trial_hparams(job.trial_dir, job.params, job.seed)
        except Exception as err:  # the hparams view is a convenience: never fail a finished trial for it
            log.warning("could not write the hparams of %s: %s", job.trial_id, err)
    atomic_write_json(os.path.join(job.trial_dir, STATUS_FILE), status)
    return status


def _ray_trainable(config: dict[str, Any], jobs: dict[str, TrialJob], isolate: bool = False) -> None:
    from ray import tune

    status = run_trial(jobs[config["trial_id"]], in_process=not isolate)
    tune.report({"finished": status.get("status") == FINISHED, "returncode": status.get("returncode", 0)})


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with one message, when ``address`` (``host:port`` of a Ray head) accepts no connection.

    ``auto``, ``local`` and ``ray://`` (Ray Client) addresses are left to ``ray.init``.

    Raises:
        ConnectionError: If nothing listens at ``host:port``, or it is not ``host:port``.
    """
    import socket

    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"Expected `address` to be `host:port` of a running Ray head (`ray start --head "
                              f"--port PORT`), `auto` or `ray://host:port`, but got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ConnectionError(f"Expected `address` {address!r} to be a running Ray cluster, but it cannot be "
                              f"reached ({err}); start one with `ray start --head --port {port}` or leave "
                              f"`--address` out to start Ray locally") from None


def _lost_ray_trial(job: TrialJob, error: str) -> dict[str, Any]:
    """Mark a trial whose Ray worker (or node) died ``failed`` with Ray's reason; it resumes on a rerun."""
    status = {"trial_id": job.trial_id, "params": job.params, "seed": job.seed, "config_digest": job.config_digest,
              "status": FAILED, "error": error, "ended": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(os.path.join(job.trial_dir, STATUS_FILE), status)
    return status


def run_ray(jobs: Sequence[TrialJob], storage: str, max_concurrent: Optional[int] = None, cpus_per_trial: float = 1,
            address: Optional[str] = None, num_cpus: Optional[int] = None,
            isolate: bool = False) -> list[dict[str, Any]]:
    """Run the trials as Ray Tune trials: ``tune.Tuner`` over a function trainable that calls ``run_trial``.

    The trainable runs each trial in the Ray worker process itself (``run_trial(in_process=True)``), and Tune
    reuses its actors (``reuse_actors=True``), so a worker imports torch and Lightning once for many trials; with
    ``isolate`` each trial runs ``lightning fit`` in its own subprocess instead. Both write the same files as the
    sequential engine. Tune schedules the trials (``max_concurrent_trials``, ``tune.with_resources``) locally or
    on a cluster. A trial whose worker or node dies (Ray reports the error) is marked ``failed`` with Ray's reason;
    rerunning the study resumes it from its ``last.ckpt``. Finished trials are skipped; when every trial is
    finished, Ray is not even imported.

    Args:
        jobs: The trials (finished ones are skipped).
        storage: Directory for Tune's own bookkeeping (``<output>/ray``).
        max_concurrent: Trials at a time (default: as many as the resources allow).
        cpus_per_trial: CPUs Tune reserves per trial.
        address: ``host:port`` of a running cluster's head, or ``"auto"``; ``None`` starts Ray locally.
        num_cpus: CPUs of the local Ray instance (default: all).
        isolate: One subprocess per trial instead of running it in the Ray worker.

    Returns:
        The status of every trial, in order, read back from the trials' ``status.json``.

    Raises:
        ImportError: If Ray Tune is not installed (and some trial is to run), saying how to install it.
        ConnectionError: If ``address`` cannot be reached (before any trial starts; checked only when some trial is
            to run).
    """
    pending = [job for job in jobs if not is_finished(job.trial_dir)]
    errors: dict[str, str] = {}
    if pending:  # Ray is imported, started or joined only when some trial is to run
        try:
            import ray
            from ray import tune
        except ImportError as err:
            raise ImportError("`--engine ray` needs Ray Tune: pip install 'lightning-probes[ray]' "
                              "(or pip install 'ray[tune]')") from err
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        if address:
            check_ray_address(address)
        started_here = not ray.is_initialized()
        if started_here:
            kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": num_cpus}
            try:
                ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
            except ConnectionError as err:
                raise ConnectionError(f"Expected `address` {address!r} to be a running Ray cluster, but "
                                      f"ray.init failed: {str(err).splitlines()[0]}") from None
        try:
            trainable = tune.with_resources(
                tune.with_parameters(_ray_trainable, jobs={j.trial_id: j for j in pending}, isolate=isolate),
                {"cpu": cpus_per_trial})
            tuner = tune.Tuner(
                trainable,
                param_space={"trial_id": tune.grid_search([j.trial_id for j in pending])},
                tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=max_concurrent,
                                            reuse_actors=not isolate),
                run_config=tune.RunConfig(name="tune", storage_path=os.path.abspath(storage), verbose=0),
            )
            for result in tuner.fit():
                if result.error is not None:
                    trial_id = (result.config or {}).get("trial_id")
                    first = str(result.error).strip().splitlines()
                    errors[trial_id] = f"Ray: {type(result.error).__name__}: {first[0] if first else ''}".strip()
        finally:
            if started_here:
                ray.shutdown()
    statuses = []
    for job in jobs:
        status = read_status(job.trial_dir)
        if status is None:  # the worker died before writing it
            status = _lost_ray_trial(job, (errors.get(job.trial_id) or "the Ray worker ended before the trial did")
                                     + "; rerun the study to resume it from its last checkpoint")
        statuses.append(status)
    return statuses
