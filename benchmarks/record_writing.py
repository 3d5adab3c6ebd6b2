"""What writing the records costs: both gradient probes at every step on the MNIST MLP (random MNIST-shaped data),
their records written as they come (``flush_every_n_steps=1``: one append and one flush per probe and logged step,
as before the records were buffered) against written in bulk (the default: every ``log_every_n_steps=50``).

Every configuration runs in this one process, ``--steps`` (long) and ``--short-steps`` (short) optimiser steps,
interleaved over ``--repeats`` in a shuffled order, medians. Per configuration: the marginal step (long minus
short, wall and CPU ``process_time``) against the bare run's, and the CPU time spent in the probes' writing path
(`ProbeCallback.write_records`, `defer_records` and `flush_records`, which makes the deferred records and appends
them) per step.

    python benchmarks/record_writing.py --threads 1
    python benchmarks/record_writing.py --smoke
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from _common import (
    add_output_argument,
    add_threads_argument,
    bare_trainer,
    output_dir,
    quiet,
    random_loader,
    set_threads,
)

from lightning_probes import GradientDynamicsMonitor, GradientStatsMonitor
from lightning_probes.models import MLP

CONFIGS = {"bare": None, "written as they come (flush_every_n_steps=1)": 1, "in bulk (default)": None}
_WRITING = ("write_records", "defer_records", "flush_records")


def run(config: str, steps: int, loader, root: str) -> tuple[float, float, float]:
    """``(wall s, CPU s, CPU s in the writing path)`` of one fit."""
    probes = []
    writing = [0.0]
    if config != "bare":
        flush = CONFIGS[config]
        probes = [GradientStatsMonitor(every_n_steps=1, flush_every_n_steps=flush, output_dir=root),
                  GradientDynamicsMonitor(every_n_steps=1, flush_every_n_steps=flush, output_dir=root)]
        for probe in probes:
            for name in _WRITING:
                original = getattr(probe, name)

                def timed(*args, _original=original, **kwargs):
                    start = time.process_time()
                    try:
                        return _original(*args, **kwargs)
                    finally:
                        writing[0] += time.process_time() - start

                setattr(probe, name, timed)
    trainer = bare_trainer(max_steps=steps, limit_val_batches=0, callbacks=probes, default_root_dir=root,
                           log_every_n_steps=50)
    torch.manual_seed(0)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(MLP(), loader)
    return time.perf_counter() - wall, time.process_time() - cpu, writing[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="long fit (default 200; smoke 6)")
    parser.add_argument("--short-steps", type=int, default=None, help="short fit (default 50; smoke 3)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; smoke 1)")
    parser.add_argument("--smoke", action="store_true", help="a few steps: that it runs")
    add_output_argument(parser)
    add_threads_argument(parser)
    args = parser.parse_args()
    args.steps = args.steps or (6 if args.smoke else 200)
    args.short_steps = args.short_steps or (3 if args.smoke else 50)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if not 1 <= args.short_steps < args.steps:
        parser.error(f"--short-steps ({args.short_steps}) must be at least 1 and below --steps ({args.steps})")
    set_threads(args.threads)
    quiet()
    loader = random_loader(args.steps * 128, (1, 28, 28), 128)
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    with output_dir(args.output) as root:
        rng = random.Random(0)
        count = 0
        for _ in range(args.repeats):
            runs = [(c, n) for c in CONFIGS for n in (args.short_steps, args.steps)]
            rng.shuffle(runs)
            for config, steps in runs:
                count += 1
                results.setdefault((config, steps), []).append(run(config, steps, loader, f"{root}/run{count}"))
    span = args.steps - args.short_steps

    def marginal(config: str, index: int) -> float:
        return (statistics.median(r[index] for r in results[config, args.steps])
                - statistics.median(r[index] for r in results[config, args.short_steps])) / span

    bare_wall, bare_cpu = marginal("bare", 0), marginal("bare", 1)
    print(f"MLP, batch 128, both gradient probes every step, {args.short_steps} vs {args.steps} steps, "
          f"{args.repeats} repeats, {torch.get_num_threads()} threads, medians{' SMOKE' if args.smoke else ''}")
    print(f"bare marginal step: {bare_wall * 1e3:.2f} ms wall, {bare_cpu * 1e3:.2f} ms CPU")
    print("| records | marginal step / bare (wall) | marginal step / bare (CPU) | writing path CPU ms per step "
          "| writing / bare CPU step |")
    print("|---|---|---|---|---|")
    for config in list(CONFIGS)[1:]:
        write_ms = statistics.median(r[2] for r in results[config, args.steps]) / args.steps * 1e3
        wall = marginal(config, 0) / bare_wall if bare_wall > 0 else float("nan")
        cpu = marginal(config, 1) / bare_cpu if bare_cpu > 0 else float("nan")
        print(f"| {config} | {wall:.3f}x | {cpu:.3f}x | {write_ms:.2f} | {write_ms / (bare_cpu * 1e3):.3f} |")


if __name__ == "__main__":
    main()
