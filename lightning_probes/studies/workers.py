"""The sequential engine: ``N`` long-lived worker processes that import torch and Lightning once and run trial after
trial (``run_sequential``; with ``isolate``, one ``lightning fit`` process per trial instead).

``TrialWorkers`` starts ``N`` worker processes (``multiprocessing``, ``spawn``), waits until each has imported
``lightning_probes.cli`` (a worker that cannot start raises ``WorkerStartError`` before any trial runs), then feeds
them the trials from a queue, one trial per worker at a time, over one pipe per worker. A worker runs each trial with
``runner.run_trial(job, in_process=True)`` (``lightning_probes.studies.in_process``), which writes the same files as a
trial in its own processes and its ``status.json``.

A trial that kills its worker (a segfault, the out-of-memory killer, ``kill -9``) is marked ``failed`` with the
signal in ``status.json`` and its ``fit.log``; the worker is replaced and the study goes on. Rerunning the study
restarts that trial from its ``last.ckpt``. Workers ignore ``SIGINT``: on ``Ctrl-C`` the study kills them, and the
running trials, as with ``--isolate``, get no ``status.json`` (they restart from their last checkpoint next time).

Example:
    >>> with TrialWorkers(2) as workers:  # doctest: +SKIP
    ...     statuses = workers.run(jobs)
"""

from __future__ import annotations

import collections
import importlib
import logging
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import wait
from typing import Any, Optional

from lightning_probes.io import atomic_write_json
from lightning_probes.studies.runner import FAILED, STATUS_FILE, TrialJob, is_finished, read_status, run_trial

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PRELOAD", "TrialWorkers", "WorkerStartError", "describe_exit", "run_sequential",
           "threads_per_worker"]

# Imported by every worker before it says it is ready: the CLI imports torch, Lightning, the models, DataModules
# and probes (seconds, once per worker instead of once per trial).
DEFAULT_PRELOAD = ("lightning_probes.cli",)


class WorkerStartError(RuntimeError):
    """A worker process could not start (its import failed, or it died or hung before it was ready)."""


def describe_exit(exitcode: Optional[int]) -> str:
    """A process's exit code in words: ``killed by signal 9 (SIGKILL: kill -9 or the out-of-memory killer)``."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        why = {"SIGKILL": ": kill -9 or the out-of-memory killer", "SIGSEGV": ": a segmentation fault"}.get(name, "")
        return f"killed by signal {-exitcode} ({name}{why})"
    return f"exited with status {exitcode}"


def threads_per_worker(num_workers: int) -> int:
    """Intra-op threads of each of ``num_workers`` workers: this process's CPUs shared out, at least 1.

    ``N`` workers each running torch's default (one thread per CPU) oversubscribe the machine ``N``-fold, and
    torch's OpenMP threads then wait on each other: on 2 cores, 2 workers of 2 threads each took 10-20x the CPU time
    per trial of 2 workers of 1 thread. Ray Tune does the same for its trials (``OMP_NUM_THREADS`` = the trial's
    CPUs).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, num_workers))


def _worker_main(conn: Any, preload: Sequence[str], threads: Optional[int] = None) -> None:
    """A worker's life: import ``preload``, say ``ready``, then run each trial it receives until ``None``.

    ``threads``: intra-op threads of torch in this worker (``OMP_NUM_THREADS`` too, before torch is imported);
    ``None`` leaves torch's default.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the study's to handle: it kills the workers
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        for name in preload:
            importlib.import_module(name)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
    except BaseException as err:
        conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid(), None))
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the study is gone
            return
        if job is None:
            return
        try:
            status = run_trial(job, in_process=True)
        except BaseException as err:  # a bug of ours, not the trial's: report it as the trial's failure
            status = {"trial_id": job.trial_id, "params": job.params, "seed": job.seed, "status": FAILED,
                      "error": f"the worker failed around the trial: {type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()}
        conn.send(("done", status, None))


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, context: Any, preload: Sequence[str], index: int, threads: Optional[int] = None) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, tuple(preload), threads),
                                       name=f"lightning-probes-trial-worker-{index}", daemon=False)
        self.process.start()
        child.close()
        self.job: Optional[TrialJob] = None
        self.started = 0.0

    def wait_ready(self, timeout: float) -> None:
        """Block until the worker says it is ready; ``WorkerStartError`` if it fails, dies or takes too long."""
        ready = wait([self.conn, self.process.sentinel], timeout)
        if self.conn in ready:
            try:
                kind, payload, details = self.conn.recv()
            except EOFError:
                kind, payload, details = "died", None, None
            if kind == "ready":
                return
            if kind == "error":
                self.kill()
                raise WorkerStartError(f"a trial worker could not start: {payload}\n{details or ''}".strip())
        elif not ready:
            self.kill()
            raise WorkerStartError(f"a trial worker did not start within {timeout:g} s")
        self.process.join(5)
        raise WorkerStartError(f"a trial worker could not start: it {describe_exit(self.process.exitcode)}")

    def kill(self) -> None:
        """End the worker at once (SIGKILL) and reap it."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()


class TrialWorkers:
    """``num_workers`` long-lived processes running trials in-process, fed from a queue.

    Args:
        num_workers: Worker processes (at least 1).
        preload: Modules every worker imports before it is ready (default ``DEFAULT_PRELOAD``).
        start_timeout: Seconds a worker may take to import ``preload``.
        threads: Intra-op threads of torch in each worker; default `threads_per_worker` (the CPUs shared out), or
            torch's own default when ``OMP_NUM_THREADS`` is set in the environment (the user's choice).

    Raises:
        ValueError: If ``num_workers`` is not a positive integer.
    """

    def __init__(self, num_workers: int = 1, preload: Optional[Sequence[str]] = None,
                 start_timeout: float = 600.0, threads: Optional[int] = None) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"Expected `workers` to be a positive integer (long-lived trial processes), but got "
                             f"{num_workers!r}; use --isolate for one process per trial")
        if not start_timeout > 0:
            raise ValueError(f"Expected `start_timeout` to be positive seconds, but got {start_timeout!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"Expected `threads` to be a positive integer or None, but got {threads!r}")
        if threads is None and "OMP_NUM_THREADS" not in os.environ:
            threads = threads_per_worker(num_workers)
        self.threads = threads
        self.num_workers = num_workers
        self.preload = tuple(DEFAULT_PRELOAD if preload is None else preload)
        self.start_timeout = float(start_timeout)
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._ready = False
        self.replaced = 0

    def _spawn(self) -> _Worker:
        return _Worker(self._context, self.preload, len(self._workers) + self.replaced, self.threads)

    def launch(self) -> TrialWorkers:
        """Start the worker processes without waiting for them (they import while the caller does other work)."""
        if not self._workers:
            self._workers = [self._spawn() for _ in range(self.num_workers)]
            self._ready = False
        return self

    def start(self) -> TrialWorkers:
        """Start every worker (unless ``launch`` did) and wait until all are ready (in parallel).

        Raises:
            WorkerStartError: If one cannot start; the others are stopped.
        """
        self.launch()
        if self._ready:
            return self
        try:
            for worker in self._workers:
                worker.wait_ready(self.start_timeout)
        except BaseException:
            self.close()
            raise
        self._ready = True
        return self

    def close(self) -> None:
        """Stop the workers: idle ones are asked to exit, busy ones (Ctrl-C) are killed."""
        for worker in self._workers:
            if worker.job is None and worker.process.is_alive():
                try:
                    worker.conn.send(None)
                except (OSError, ValueError):
                    pass
        for worker in self._workers:
            if worker.job is None:
                worker.process.join(10)
            worker.kill()
        self._workers = []
        self._ready = False

    def __enter__(self) -> TrialWorkers:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """The process ids of the current workers."""
        return [w.process.pid for w in self._workers]

    def _lost(self, worker: _Worker) -> dict[str, Any]:
        """Mark the trial whose worker died ``failed`` with the reason; return its status."""
        job = worker.job
        assert job is not None
        worker.process.join(10)
        reason = (f"the trial's worker process (pid {worker.process.pid}) {describe_exit(worker.process.exitcode)} "
                  f"while running it; rerun the study to resume it from its last checkpoint")
        with open(os.path.join(job.trial_dir, "fit.log"), "a", encoding="utf-8") as out:
            out.write(f"\n{reason}\n")
        status = {"trial_id": job.trial_id, "params": job.params, "seed": job.seed,
                  "config_digest": job.config_digest, "status": FAILED, "error": reason,
                  "returncode": worker.process.exitcode, "wall_s": round(time.time() - worker.started, 2),
                  "ended": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(os.path.join(job.trial_dir, STATUS_FILE), status)
        return status

    def run(self, jobs: Sequence[TrialJob], progress: bool = True) -> list[dict[str, Any]]:
        """Run the trials (finished ones are skipped without a worker) and return every trial's status, in order.

        A failed trial, or one that kills its worker, does not stop the others; a dead worker is replaced.

        Args:
            jobs: The trials.
            progress: Show a tqdm progress bar.

        Raises:
            WorkerStartError: If a replacement worker cannot start (the trials not yet run keep no status).
        """
        from tqdm.auto import tqdm

        statuses: dict[str, dict[str, Any]] = {}
        queue: collections.deque[TrialJob] = collections.deque()
        for job in jobs:
            if is_finished(job.trial_dir):
                statuses[job.trial_id] = {**(read_status(job.trial_dir) or {}), "skipped": True}
            else:
                queue.append(job)
        if queue:
            self.start()
        bar = tqdm(total=len(jobs), initial=len(statuses), desc="trials", unit="trial", disable=not progress)
        try:
            while queue or any(w.job is not None for w in self._workers):
                for worker in self._workers:
                    if worker.job is None and queue:
                        worker.job, worker.started = queue.popleft(), time.time()
                        worker.conn.send(worker.job)
                busy = [w for w in self._workers if w.job is not None]
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for worker in busy:
                    if worker.conn not in ready and worker.process.sentinel not in ready:
                        continue
                    status = None
                    if worker.conn.poll():
                        try:
                            kind, status, _ = worker.conn.recv()
                        except (EOFError, OSError):
                            status = None
                    if status is None:
                        if worker.process.is_alive() and worker.process.sentinel not in ready:
                            continue
                        status = self._lost(worker)
                        log.warning("trial %s: %s", worker.job.trial_id, status["error"])
                        self._replace(worker)
                    elif status.get("status") == FAILED:
                        log.warning("trial %s failed: %s", worker.job.trial_id, status.get("error"))
                    statuses[worker.job.trial_id] = status
                    worker.job = None
                    bar.update(1)
                    bar.set_postfix_str(f"{sum(s.get('status') == FAILED for s in statuses.values())} failed")
        finally:
            bar.close()
        return [statuses.get(job.trial_id) or {"trial_id": job.trial_id, "params": job.params, "seed": job.seed,
                                               "status": "pending"} for job in jobs]

    def _replace(self, dead: _Worker) -> None:
        dead.kill()
        self.replaced += 1
        index = self._workers.index(dead)
        fresh = self._spawn()
        self._workers[index] = fresh
        try:
            fresh.wait_ready(self.start_timeout)
        except WorkerStartError:
            self._workers.pop(index)
            if not self._workers:
                raise
            log.warning("a replacement trial worker could not start; going on with %d", len(self._workers))


def run_sequential(jobs: Sequence[TrialJob], progress: bool = True, workers: int = 1,
                   isolate: bool = False, pool: Optional[TrialWorkers] = None) -> list[dict[str, Any]]:
    """Run the trials on this machine: in ``workers`` long-lived processes, or one process per trial.

    By default ``workers`` long-lived processes (``TrialWorkers``) import once and
    run the trials from a queue, in-process; with ``isolate`` each trial runs as its own ``lightning fit`` (and
    ``test``) subprocess, one after another, as for code that leaks global state. Finished trials are skipped
    without starting any process (no worker at all when every trial is finished). Either way a failed trial does
    not stop the others. ``KeyboardInterrupt`` stops at once: the running trials are killed and get no
    ``status.json`` (they restart from their last checkpoint next time); finished trials are untouched.

    Args:
        jobs: The trials.
        progress: Show a tqdm progress bar.
        workers: Long-lived worker processes (ignored with ``isolate``).
        isolate: One process per trial instead of long-lived workers.
        pool: Already launched ``TrialWorkers`` to use (the caller closes them); default: start ``workers`` here.

    Returns:
        The status of every trial, in order.

    Raises:
        ValueError: If ``workers`` is not a positive integer.
        WorkerStartError: If a worker cannot start (before any trial runs).
    """
    from tqdm.auto import tqdm

    if pool is not None:
        return pool.run(jobs, progress=progress)
    if not isolate:
        own = TrialWorkers(workers)  # `run` starts the workers only if some trial is not finished
        try:
            return own.run(jobs, progress=progress)
        finally:
            own.close()
    statuses = []
    bar = tqdm(jobs, desc="trials", unit="trial", disable=not progress)
    for job in bar:
        bar.set_postfix_str(job.trial_id)
        status = run_trial(job)
        if status.get("status") == FAILED:
            log.warning("trial %s failed: %s", job.trial_id, status.get("error"))
        statuses.append(status)
    return statuses
