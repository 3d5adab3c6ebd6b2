"""``lightning-probes study``: run a grid of configs x seeds and aggregate the runs.

Usage:
    lightning-probes study --config configs/studies/quick.yaml [--engine sequential|ray] [--max_concurrent N]
                           [--output DIR] [--dry_run] [--num_samples N] [--workers N] [--isolate]
                           [--address HOST:PORT|auto] [--num_cpus N] [--cpus_per_trial X]
    python -m lightning_probes.commands.study --config configs/studies/quick.yaml

Writes ``<output>/trials/<trial_id>/`` (one ordinary Lightning run each), ``trials.csv``, ``summary.json``,
``summary.md``, ``figures/*.png`` and the TensorBoard run ``<output>/summary/``. Rerunning the same command skips
finished trials and restarts the others from their ``last.ckpt``; when every trial is finished it starts no worker
process and no Ray, and only checks the configs and rewrites the summary. A bad study file gives one ``error:`` line
and exit status 2 before any trial starts.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, Optional

log = logging.getLogger(__name__)

__all__ = ["build_parser", "main", "study"]


def study(
    config: str,
    engine: Literal["sequential", "ray"] = "sequential",
    max_concurrent: Optional[int] = None,
    output: Optional[str] = None,
    dry_run: bool = False,
    address: Optional[str] = None,
    num_cpus: Optional[int] = None,
    cpus_per_trial: float = 1.0,
    progress: bool = True,
    num_samples: Optional[int] = None,
    workers: int = 1,
    isolate: bool = False,
) -> int:
    """Run a study and write its summary.

    Args:
        config: The study file (``configs/studies/<study>.yaml``).
        engine: ``sequential`` (one trial after another, no extra dependency) or ``ray`` (Ray Tune trials, in
            parallel; ``pip install 'lightning-probes[ray]'``).
        max_concurrent: Trials at a time with ``--engine ray`` (default: as many as the CPUs allow).
        output: Output directory (default: the study file's ``output``, else ``runs/studies/<name>``).
        dry_run: List the trials and exit.
        address: Ray cluster address (``auto`` joins a running cluster); default: start Ray locally.
        num_cpus: CPUs of a local Ray instance (default: all).
        cpus_per_trial: CPUs Ray reserves for each trial.
        progress: Show a progress bar (sequential engine).
        num_samples: Draws of a study with ``sample:``, overriding the file's ``num_samples``.
        workers: Long-lived worker processes of the sequential engine, each running trial after trial in-process
            (imports once instead of once per trial).
        isolate: Run every trial as its own ``lightning fit``/``test`` processes (either engine), for code that
            leaks global state from one trial into the next.

    Returns:
        The exit status: 0 when every trial finished, 1 when some failed.
    """
    from lightning_probes.studies import prepare_study, run_ray, run_sequential, unfinished_trials, write_study_summary

    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError(f"Expected `max_concurrent` to be a positive integer, but got {max_concurrent}")
    if not cpus_per_trial > 0:
        raise ValueError(f"Expected `cpus_per_trial` to be positive, but got {cpus_per_trial}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"Expected `workers` to be a positive integer (long-lived trial processes), but got "
                         f"{workers!r}; use --isolate for one process per trial")
    if engine == "ray" and workers != 1:
        raise ValueError(f"`workers` ({workers}) sets the sequential engine's long-lived processes; with `--engine "
                         f"ray` Ray starts (and reuses) them: set `--max_concurrent` instead")
    if address is not None and engine != "ray":
        raise ValueError(f"`address` ({address!r}) joins a Ray cluster: it needs `--engine ray`, but got engine "
                         f"{engine!r}")
    pool = None
    if engine == "sequential" and not isolate and not dry_run and unfinished_trials(config, output, num_samples):
        from lightning_probes.studies.workers import TrialWorkers

        pool = TrialWorkers(workers).launch()  # the workers import torch and Lightning while the configs resolve
    try:
        prepared = prepare_study(config, output=output, write=not dry_run, num_samples=num_samples)
        spec = prepared.spec
        if dry_run:
            from lightning_probes.studies.runner import is_finished

            lines = [f"study {spec.name}: {len(prepared.trials)} trials -> {spec.output}"]
            for job in prepared.jobs:
                state = "finished" if is_finished(job.trial_dir) else "to run"
                lines.append(f"  {job.trial_id}\t{state}")
            sys.stdout.write("\n".join(lines) + "\n")
            return 0
        log.info("study %s: %d trials -> %s (engine %s)", spec.name, len(prepared.jobs), spec.output, engine)
        try:
            if engine == "ray":
                statuses = run_ray(prepared.jobs, storage=os.path.join(spec.output, "ray"),
                                   max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial, address=address,
                                   num_cpus=num_cpus, isolate=isolate)
            else:
                statuses = run_sequential(prepared.jobs, progress=progress, workers=workers, isolate=isolate,
                                          pool=pool)
        except KeyboardInterrupt:
            sys.stderr.write("interrupted: finished trials are kept; rerun the same command to continue\n")
            write_study_summary(prepared, figures=False)
            raise
    finally:
        if pool is not None:
            pool.close()
    summary = write_study_summary(prepared)
    failed = [s for s in statuses if s.get("status") != "finished"]
    sys.stdout.write(f"study {spec.name}: {summary['n_finished']} finished, {len(failed)} failed; summary in "
                     f"{os.path.join(spec.output, 'summary.md')}\n")
    for status in failed:
        sys.stderr.write(f"failed: {status.get('trial_id')}: {status.get('error')}\n")
    return 1 if failed else 0


def build_parser():
    """The command's jsonargparse parser (the arguments of ``study``; ``--dry_run`` is a flag)."""
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog="lightning-probes study", description=__doc__.split("\n\n")[0],
                            default_env=False)
    parser.add_argument("--config", type=str, required=True, help="The study file (configs/studies/<study>.yaml).")
    parser.add_argument("--engine", type=Literal["sequential", "ray"], default="sequential",
                        help="sequential (one trial after another) or ray (Ray Tune trials, in parallel).")
    parser.add_argument("--max_concurrent", type=Optional[int], default=None,
                        help="Trials at a time with --engine ray (default: as many as the CPUs allow).")
    parser.add_argument("--output", type=Optional[str], default=None,
                        help="Output directory (default: the study file's `output`, else runs/studies/<name>).")
    parser.add_argument("--dry_run", action=ActionYesNo, default=False, help="List the trials and exit.")
    parser.add_argument("--address", type=Optional[str], default=None,
                        help="Ray cluster address (`auto` joins a running cluster); default: start Ray locally.")
    parser.add_argument("--num_cpus", type=Optional[int], default=None, help="CPUs of a local Ray instance.")
    parser.add_argument("--cpus_per_trial", type=float, default=1.0, help="CPUs Ray reserves for each trial.")
    parser.add_argument("--workers", type=int, default=1,
                        help="Long-lived worker processes of the sequential engine, each running trial after trial "
                             "in-process (default 1).")
    parser.add_argument("--isolate", action=ActionYesNo, default=False,
                        help="One lightning fit/test process per trial (either engine), for code that leaks global "
                             "state.")
    parser.add_argument("--progress", action=ActionYesNo, default=True, help="Show a progress bar.")
    parser.add_argument("--num_samples", type=Optional[int], default=None,
                        help="Draws of a study with `sample:` (overrides the file's num_samples).")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-probes study ...`` (``argv`` without the ``study`` word).

    Raises:
        SystemExit: 2 with one ``error:`` line for a bad study file or argument; 1 if a trial failed; 130 on
            ``Ctrl-C``.
    """
    from lightning_probes.studies.spec import StudyError
    from lightning_probes.studies.workers import WorkerStartError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    kwargs = {k: v for k, v in vars(args).items() if k in study.__code__.co_varnames}
    try:
        code = study(**kwargs)
    except (StudyError, ValueError, ImportError, WorkerStartError, ConnectionError) as err:
        if os.environ.get("LIGHTNING_PROBES_DEBUG"):
            raise
        sys.stderr.write(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
