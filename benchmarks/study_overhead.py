"""What a study costs beyond its trials' own training: the per-trial overhead and the quick study's wall time.

1. Per-trial overhead. The trials of ``configs/studies/quick.yaml`` run in this process, as a long-lived worker runs
   them (``run_trial(job, in_process=True)``), with ``Trainer.fit`` and ``Trainer.test`` timed from outside; the
   trial's overhead is its wall time minus its own fit + test time: parsing and instantiating the config twice (fit,
   test), logger and checkpoint files, the TensorBoard hparams. The first trial of the process also pays one-off
   lazy imports and is reported apart; the median is over the others. Interleaved with each, the same trial runs with
   ``--isolate`` (a ``lightning fit`` and a ``lightning test`` subprocess): its overhead is its wall time minus the
   in-process run's fit + test time. Target: <= 1 s per trial.
2. The quick study end to end: ``lightning-probes study --config configs/studies/quick.yaml --workers N`` as a
   subprocess, wall time and CPU time (user + system of every process). Target: <= 30 s on 2 cores.

Wall time is noisy on a shared machine: CPU seconds (``time.process_time``, ``RUSAGE_CHILDREN``) are reported beside.

    python benchmarks/study_overhead.py --threads 1 --repeats 2
    python benchmarks/study_overhead.py --smoke                       # seconds: 2 tiny trials, tiny study
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import yaml
from _common import add_output_argument, add_threads_argument, output_dir, quiet, set_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "studies", "quick.yaml")


def smoke_study(root: str) -> str:
    """A 2-trial study of the quick start with a few batches (for ``--smoke``)."""
    study = {"name": "smoke", "base": os.path.join(ROOT, "configs", "quickstart.yaml"),
             "overrides": {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2, "trainer.limit_val_batches": 1,
                           "trainer.limit_test_batches": 1,
                           "trainer.callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"save_last": True}}]},
             "grid": {"model.init_args.lr": [0.1, 0.02]}, "seeds": [1], "monitor": "val/acc", "test": True}
    path = os.path.join(root, "smoke.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(study, f, sort_keys=False)
    return path


class _TrainerClock:
    """Wall and CPU seconds spent inside ``Trainer.fit`` and ``Trainer.test`` (patched on the class)."""

    def __init__(self) -> None:
        import pytorch_lightning as pl

        self.wall = self.cpu = 0.0
        self._originals = {name: getattr(pl.Trainer, name) for name in ("fit", "test")}
        for name, original in self._originals.items():
            setattr(pl.Trainer, name, self._wrap(original))

    def _wrap(self, original):
        clock = self

        # LightningCLI builds each subcommand's options from the method's signature (`test --ckpt_path`): keep it.
        @functools.wraps(original)
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                clock.wall += time.perf_counter() - wall
                clock.cpu += time.process_time() - cpu
        return timed

    def reset(self) -> None:
        self.wall = self.cpu = 0.0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def trial_overhead(study_file: str, root: str, repeats: int, isolate: bool) -> dict[str, Any]:
    """Run every trial of the study ``repeats`` times in-process (and, if ``isolate``, interleaved in subprocesses)."""
    from lightning_probes.studies import prepare_study
    from lightning_probes.studies.runner import run_trial

    clock = _TrainerClock()
    rows = []
    for repeat in range(repeats):
        for mode in ("in_process", "isolate") if isolate else ("in_process",):
            out = os.path.join(root, f"trials_{mode}_{repeat}")
            shutil.rmtree(out, ignore_errors=True)
            prepared = prepare_study(study_file, output=out, cwd=root)
            for job in prepared.jobs:
                clock.reset()
                wall, cpu, child = time.perf_counter(), time.process_time(), _children_cpu()
                status = run_trial(job, in_process=mode == "in_process")
                if status["status"] != "finished":
                    raise RuntimeError(f"trial {job.trial_id} ({mode}) failed: {status.get('error')}")
                rows.append({"mode": mode, "repeat": repeat, "trial": job.trial_id, "status": status["status"],
                             "wall_s": time.perf_counter() - wall,
                             "cpu_s": time.process_time() - cpu + _children_cpu() - child,
                             "fit_test_wall_s": clock.wall, "fit_test_cpu_s": clock.cpu})
    inner = {(r["repeat"], r["trial"]): r for r in rows if r["mode"] == "in_process"}
    first = rows[0]
    result: dict[str, Any] = {"rows": rows, "first_trial": {
        "wall_s": first["wall_s"], "overhead_wall_s": first["wall_s"] - first["fit_test_wall_s"]}}
    for mode in ("in_process", "isolate"):
        chosen = [r for r in rows if r["mode"] == mode and r is not first]
        if not chosen:
            continue
        own = [inner[(r["repeat"], r["trial"])] for r in chosen]
        result[mode] = {
            "trials": len(chosen),
            "median_wall_s": statistics.median(r["wall_s"] for r in chosen),
            "median_fit_test_wall_s": statistics.median(o["fit_test_wall_s"] for o in own),
            "median_overhead_wall_s": statistics.median(r["wall_s"] - o["fit_test_wall_s"]
                                                        for r, o in zip(chosen, own)),
            "median_overhead_cpu_s": statistics.median(r["cpu_s"] - o["fit_test_cpu_s"] for r, o in zip(chosen, own)),
        }
    return result


def study_wall(study_file: str, root: str, workers: int, threads: int | None) -> dict[str, Any]:
    """``lightning-probes study`` end to end in a subprocess: wall and CPU seconds."""
    out = os.path.join(root, f"study_workers{workers}")
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "lightning_probes.cli", "study", "--config", study_file, "--output", out,
               "--workers", str(workers), "--no_progress"]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    wall, child = time.perf_counter(), _children_cpu()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - wall
    if done.returncode != 0:
        raise RuntimeError(f"the study failed ({done.returncode}): {done.stderr[-2000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        finished = json.load(f)["n_finished"]
    return {"workers": workers, "wall_s": wall, "cpu_s": _children_cpu() - child, "finished": finished}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=QUICK, help="the study file (default configs/studies/quick.yaml)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every trial per mode")
    parser.add_argument("--workers", type=int, default=2, help="--workers of the end-to-end study")
    parser.add_argument("--no-isolate", action="store_true", help="skip the one-process-per-trial comparison")
    parser.add_argument("--smoke", action="store_true",
                        help="2 tiny trials, in-process only; the tiny study end to end with 1 worker")
    add_threads_argument(parser)
    add_output_argument(parser)
    args = parser.parse_args()
    if args.repeats < 1 or args.workers < 1:
        parser.error(f"--repeats and --workers must be positive, got {args.repeats} and {args.workers}")
    set_threads(args.threads)
    quiet()
    with output_dir(args.output) as root:
        study_file = smoke_study(root) if args.smoke else os.path.abspath(args.config)
        overhead = trial_overhead(study_file, root, args.repeats, isolate=not (args.smoke or args.no_isolate))
        end_to_end = study_wall(study_file, root, 1 if args.smoke else args.workers, args.threads)
        results = {"study": study_file, "threads": args.threads, "overhead": overhead, "study_run": end_to_end,
                   "cpu_count": os.cpu_count()}
        with open(os.path.join(root, "study_overhead.json"), "w") as f:
            json.dump(results, f, indent=1)
    lines = ["| mode | trials | median trial wall s | its fit+test wall s | overhead wall s | overhead CPU s |",
             "|---|---|---|---|---|---|"]
    for mode in ("in_process", "isolate"):
        if mode in overhead:
            m = overhead[mode]
            lines.append(f"| {mode} | {m['trials']} | {m['median_wall_s']:.2f} | {m['median_fit_test_wall_s']:.2f} | "
                         f"{m['median_overhead_wall_s']:.2f} | {m['median_overhead_cpu_s']:.2f} |")
    first = overhead["first_trial"]
    lines.append(f"\nfirst trial of the process (one-off lazy imports): wall {first['wall_s']:.2f} s, overhead "
                 f"{first['overhead_wall_s']:.2f} s (target <= 1 s per trial)")
    lines.append(f"study end to end ({os.path.basename(study_file)}, --workers {end_to_end['workers']}, "
                 f"{end_to_end['finished']} trials): wall {end_to_end['wall_s']:.1f} s, "
                 f"CPU {end_to_end['cpu_s']:.1f} s on {os.cpu_count()} cores "
                 "(target <= 30 s for quick.yaml on 2 cores)")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
