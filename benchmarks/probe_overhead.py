"""Overhead of the gradient probes on the MNIST MLP (random MNIST-shaped data), against a bare run.

Every configuration runs the same number of optimiser steps in this one process; the runs are interleaved
(each repeat runs every configuration once, in a shuffled order) and each is compared with the bare run of the
same repeat. The table shows the median ratio of steady-state step time (first ``--warmup`` steps excluded),
the time spent inside the probes' hooks per step (a measure the machine's noise disturbs far less), and the
most bytes a probe holds between steps.

    python benchmarks/probe_overhead.py --steps 200 --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from _common import add_output_argument, output_dir
from torch.utils.data import DataLoader, TensorDataset

from lightning_probes import GradientDynamicsMonitor, GradientStatsMonitor
from lightning_probes.models import MLP


class StepTimer(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch; probe memory between steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0
        self.held_bytes = 0
        self.hook_seconds = 0.0
        self.epoch_end_seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()
        held = 0
        for cb in trainer.callbacks:
            for prev in getattr(cb, "_previous", {}).values():
                held += prev.state.numel() * prev.state.element_size()
            for key in ("_first_window", "_last_window"):
                t = getattr(cb, key, None)
                held += 0 if t is None else t.numel() * t.element_size()
        self.held_bytes = max(self.held_bytes, held)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


# Per-step hooks only: the once-per-epoch figures (sign maps) are timed apart.
_HOOKS = ("on_before_optimizer_step", "_after_step", "on_train_batch_start", "on_train_batch_end")


def _time_hooks(probe, timer: StepTimer) -> None:
    """Add the wall time spent inside the probe's per-step and per-epoch hooks to ``timer.hook_seconds``."""
    for name in _HOOKS:
        original = getattr(probe, name, None)
        if original is None:
            continue

        def wrapper(*args, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                if timer.start:
                    timer.hook_seconds += time.perf_counter() - start

        setattr(probe, name, wrapper)


def run(config: str, every: int, steps: int, warmup: int, batch_size: int, data: TensorDataset, tb: bool,
        root: str) -> StepTimer:
    probes = []
    if config in ("stats", "both"):
        probes.append(GradientStatsMonitor(every_n_steps=every))
    if config in ("dynamics", "both"):
        probes.append(GradientDynamicsMonitor(every_n_steps=every))
    timer = StepTimer(warmup)
    for probe in probes:
        _time_hooks(probe, timer)
        original = probe.on_train_epoch_end

        def epoch_end(*args, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                timer.epoch_end_seconds += time.perf_counter() - start

        probe.on_train_epoch_end = epoch_end
    logger = pl.loggers.TensorBoardLogger(root, name=f"{config}_every{every}") if tb else False
    trainer = pl.Trainer(max_steps=steps, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                         callbacks=[timer, *probes], accelerator="cpu", log_every_n_steps=50)
    torch.manual_seed(0)
    trainer.fit(MLP(), DataLoader(data, batch_size=batch_size, shuffle=True))
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 4, 16, 50])
    parser.add_argument("--no-tensorboard", action="store_true", help="run without a logger")
    add_output_argument(parser)
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with output_dir(args.output) as root:
        measure(args, root)


def measure(args: argparse.Namespace, root: str) -> None:

    n = args.batch_size * args.steps
    data = TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)))
    configs = [("bare", 0)] + [(c, e) for e in args.every for c in ("stats", "dynamics", "both")]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    hooks: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    epoch_ends: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    held: dict[tuple[str, int], int] = {}
    rng = random.Random(0)
    for _ in range(args.repeats):
        order = configs[:]
        rng.shuffle(order)
        for config in order:
            timer = run(*config, args.steps, args.warmup, args.batch_size, data, not args.no_tensorboard, root)
            times[config].append((timer.end - timer.start) / (args.steps - args.warmup))
            hooks[config].append(timer.hook_seconds / (args.steps - args.warmup))
            epoch_ends[config].append(timer.epoch_end_seconds)
            held[config] = timer.held_bytes
    bare = times[("bare", 0)]
    entries = sum(p.numel() for p in MLP().parameters())
    print(f"MLP ({entries:,} parameters), batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads, logger: {'TensorBoard' if not args.no_tensorboard else 'none'}")
    print(f"bare step: median {statistics.median(bare) * 1e3:.2f} ms")
    print("| probe | every_n_steps | median ratio to bare (wall) | step ms | ms per step in probe hooks "
          "| 1 + hook time / bare step | epoch-end s (figures) | bytes held between steps (per entry) |")
    print("|---|---|---|---|---|---|---|---|")
    for config in configs[1:]:
        ratios = [t / b for t, b in zip(times[config], bare)]
        hook_ms = statistics.median(hooks[config]) * 1e3
        hook_ratio = 1 + hook_ms / (statistics.median(bare) * 1e3)
        print(f"| {config[0]} | {config[1]} | {statistics.median(ratios):.3f}x | "
              f"{statistics.median(times[config]) * 1e3:.2f} | {hook_ms:.3f} | {hook_ratio:.3f}x | "
              f"{statistics.median(epoch_ends[config]):.2f} | {held[config]:,} ({held[config] / entries:.2f}) |")


if __name__ == "__main__":
    main()
