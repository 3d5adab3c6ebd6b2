"""Overhead of the gradient probes (or, with ``--set health``, of issue 32's training-health probes) on the MNIST
MLP (random MNIST-shaped data) or a 12-block transformer (random tokens), against a bare run.

Every configuration runs in this one process, twice per repeat: ``--steps`` optimiser steps (long) and
``--short-steps`` (short). The runs are interleaved (each repeat runs every configuration and length once, in a
shuffled order) and each is compared with the bare run of the same repeat and length; medians over repeats.
The table shows, per configuration:

- the ratio of steady-state step time to bare (first ``--warmup`` steps excluded) beside its target (issue 13:
  both gradient probes <= 1.10x at every step, <= 1.02x at the default cadence of 50 steps);
- the time spent inside the probes' per-step hooks, wall and CPU (``process_time``: on a shared machine the
  CPU time, with ``--threads 1``, is the measure its noise disturbs least), and ``1 + hook CPU / bare CPU step``;
- the marginal cost per step, ``(fit(long) - fit(short)) / (long - short)`` minus the same for bare, so that
  one-off costs (setup, ``torch.compile``, end-of-fit figures) neither hide nor inflate it, and those one-off
  seconds apart: ``fit(short) - bare fit(short) - short * marginal``; ``compile s`` is what the probes' compiled
  kernels took in the first run of the process (later runs reuse the graphs);
- the most bytes a probe holds between steps, and per tracked entry; and during a compared step: what the
  dynamics probe holds when the optimiser's post-step hook starts (its state buffer and the weights' copy, or the
  older version's weight copy and codes; transient temporaries inside a hook are not counted: for those see the
  peak RSS of ``benchmarks/dynamics_memory.py``).

Configurations ``+compile`` run the probes with ``compile=True``. With ``--baseline SRC`` (a source tree of an
older version, e.g. ``git archive <commit> lightning_probes | tar -x -C SRC``) every configuration also runs with
that version's probes (``old:`` rows) in the same process, interleaved with the others: before/after side by side.
``--set health`` times ``ActivationOutlierMonitor``, ``AttentionMonitor``, ``StabilityMonitor`` and
``GradientNoiseScaleMonitor`` each alone and all four together (``health``; target <= 1.03x at the default
cadences, issue 32); ``--every 0`` means each probe's default cadence. ``GradientNoiseScaleMonitor`` needs two batch
sizes: run with ``--accumulate 2`` (every configuration, bare included, then accumulates 2 micro-batches per
optimiser step) or it skips itself at setup, as it would in a real single-device run without accumulation.
Every run writes into its own directory under ``--output`` (default: a temporary directory). ``--smoke`` runs the
smallest setting (seconds). The machine may be shared: read the ratios as medians of interleaved repeats, not as
exact figures.

    python benchmarks/probe_overhead.py --threads 1 --steps 150 --repeats 5 --every 1 50 --no-tensorboard
    python benchmarks/probe_overhead.py --model transformer --threads 1 --steps 120 --every 1 50 --baseline SRC
    python benchmarks/probe_overhead.py --set health --model transformer --threads 1 --steps 150 --every 0 \
        --accumulate 2 --no-tensorboard
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import random
import statistics
import sys
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from _common import add_output_argument, output_dir
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_probes
from lightning_probes.models import MLP

#: The probe classes of each version: "" (this tree) and, with --baseline, "old".
PROBES: dict[str, tuple[Any, Any]] = {"": (lightning_probes.GradientStatsMonitor,
                                           lightning_probes.GradientDynamicsMonitor)}


#: Issue 32's probes, by configuration name (``--set health``); "health" runs all of them together.
_HEALTH_CLASSES = {"outliers": "ActivationOutlierMonitor", "attention": "AttentionMonitor",
                   "stability": "StabilityMonitor", "noise_scale": "GradientNoiseScaleMonitor"}
HEALTH = tuple(k for k, name in _HEALTH_CLASSES.items() if hasattr(lightning_probes, name))


def health_probe(kind: str, every: int) -> Any:
    """One of issue 32's probes at ``every_n_steps=every`` (``0``: the probe's default cadence)."""
    cls = getattr(lightning_probes, _HEALTH_CLASSES[kind])
    accepts = "every_n_steps" in inspect.signature(cls).parameters
    return cls(every_n_steps=every) if every and accepts else cls()


def load_baseline(source: str) -> None:
    """Import the probes of another source tree (``SRC/lightning_probes``) beside this tree's, as ``old``."""
    if not os.path.isdir(os.path.join(source, "lightning_probes")):
        raise SystemExit(f"--baseline {source!r}: expected a directory holding lightning_probes/")
    saved = {k: v for k, v in sys.modules.items() if k == "lightning_probes" or k.startswith("lightning_probes.")}
    for key in saved:
        del sys.modules[key]
    sys.path.insert(0, os.path.abspath(source))
    try:
        old = importlib.import_module("lightning_probes")
        PROBES["old"] = (old.GradientStatsMonitor, old.GradientDynamicsMonitor)
    finally:
        sys.path.pop(0)
        for key in [k for k in sys.modules if k == "lightning_probes" or k.startswith("lightning_probes.")]:
            del sys.modules[key]
        sys.modules.update(saved)


class TinyTransformer(pl.LightningModule):
    """12 pre-norm-free encoder blocks, d_model 64, 4 heads, feed-forward 128, vocabulary 100: 147 parameter
    tensors, 414,564 parameters; predicts each next token of a random sequence."""

    def __init__(self, vocab: int = 100, d_model: int = 64, layers: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        block = nn.TransformerEncoderLayer(d_model, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def training_step(self, batch, batch_idx):
        tokens = batch[0]  # (batch, tokens)
        logits = self.head(self.blocks(self.embed(tokens[:, :-1])))  # (batch, tokens - 1, vocab)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def make_model(kind: str) -> pl.LightningModule:
    return TinyTransformer() if kind == "transformer" else MLP()


def make_data(kind: str, n: int) -> TensorDataset:
    if kind == "transformer":
        return TensorDataset(torch.randint(0, 100, (n, 33)))  # 32 input tokens and their successors
    return TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)))


class StepTimer(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch; probe memory between steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0
        self.held_bytes = 0
        self.compared_bytes = 0
        self.hook_seconds = 0.0
        self.hook_cpu_seconds = 0.0
        self.cpu_start = self.cpu_end = 0.0
        self.epoch_end_seconds = 0.0
        self.fit_seconds = 0.0
        self.compile_seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
        held = 0
        for cb in trainer.callbacks:
            for prev in getattr(cb, "_previous", {}).values():
                held += prev.state.numel() * prev.state.element_size()
            for key in ("_first_window", "_last_window"):
                t = getattr(cb, key, None)
                held += 0 if t is None else t.numel() * t.element_size()
        self.held_bytes = max(self.held_bytes, held)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end, self.cpu_end = time.perf_counter(), time.process_time()


# Per-step hooks only: the once-per-epoch figures (sign maps) are timed apart.
_HOOKS = ("on_before_optimizer_step", "_after_step", "on_train_batch_start", "on_train_batch_end")


def compared_bytes(probe) -> int:
    """Bytes of the per-entry tensors the dynamics probe holds for its pending steps (this version: the state
    buffer and the weights' compact copy; the version before: the weights' float copy and the step's codes)."""
    total = 0
    for pending in getattr(probe, "_pending", {}).values():
        buffers = getattr(pending, "buffers", None)
        if buffers is not None:
            total += buffers.nbytes()
        for key in ("before", "current"):
            value = getattr(pending, key, None)
            for t in value if isinstance(value, list) else [value]:
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def _time_hooks(probe, timer: StepTimer) -> None:
    """Add the wall time spent inside the probe's per-step and per-epoch hooks to ``timer.hook_seconds``."""
    for name in _HOOKS:
        original = getattr(probe, name, None)
        if original is None:
            continue

        def wrapper(*args, _original=original, _name=name, **kwargs):
            if _name == "_after_step":
                timer.compared_bytes = max(timer.compared_bytes, compared_bytes(probe))
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return _original(*args, **kwargs)
            finally:
                if timer.start:
                    timer.hook_seconds += time.perf_counter() - start
                    timer.hook_cpu_seconds += time.process_time() - cpu

        setattr(probe, name, wrapper)


#: Targets of issue 22 for both gradient probes: (model, every_n_steps, compiled) -> most ratio to the bare step.
TARGETS = {("mlp", 1, False): 1.30, ("mlp", 1, True): 1.15, ("transformer", 1, False): 1.15,
           ("mlp", 50, False): 1.02, ("transformer", 50, False): 1.02}
_RUN_IDS = iter(range(10**9))


def run(config: str, every: int, steps: int, warmup: int, batch_size: int, data: TensorDataset, tb: bool,
        root: str, model: str = "mlp", accumulate: int = 1) -> StepTimer:
    version, _, config_name = config.rpartition(":")
    kind, _, option = config_name.partition("+")
    options = {"compile": option == "compile"}
    stats_class, dynamics_class = PROBES[version]
    probes = [health_probe(k, every) for k in HEALTH if kind in (k, "health")]
    if kind in ("stats", "both"):
        probes.append(stats_class(every_n_steps=every, **options))
    if kind in ("dynamics", "both"):
        probes.append(dynamics_class(every_n_steps=every, **options))
    timer = StepTimer(warmup * accumulate)  # batches: the timed steps are optimiser steps
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
    # Every run in a directory of its own: no run finds (and moves aside) an earlier run's files.
    run_dir = os.path.join(root, f"{config.replace(':', '_')}_every{every}_{steps}steps_{next(_RUN_IDS)}")
    logger = pl.loggers.TensorBoardLogger(run_dir, name="tb") if tb else False
    trainer = pl.Trainer(max_steps=steps, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=run_dir,
                         callbacks=[timer, *probes], accelerator="cpu", log_every_n_steps=50,
                         accumulate_grad_batches=accumulate)
    torch.manual_seed(0)
    start = time.perf_counter()
    trainer.fit(make_model(model), DataLoader(data, batch_size=batch_size, shuffle=True))
    timer.fit_seconds = time.perf_counter() - start
    timer.compile_seconds = sum(getattr(p, "compile_seconds", 0.0) for p in probes)
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("mlp", "transformer"), default="mlp",
                        help="the MNIST MLP (8 tensors) or a 12-block transformer (147 tensors, batch 16)")
    parser.add_argument("--baseline", default=None, metavar="SRC",
                        help="also run the probes of the source tree SRC (holding lightning_probes/) as 'old:' rows")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest setting (seconds): 14 and 12 steps, 1 repeat, every 1, eager, no logger")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (MLP) or 16 (transformer)")
    parser.add_argument("--every", type=int, nargs="+", default=[1, 4, 16, 50])
    parser.add_argument("--no-tensorboard", action="store_true", help="run without a logger")
    parser.add_argument("--short-steps", type=int, default=None,
                        help="length of the short runs (marginal cost = long minus short); default steps // 3, "
                             "at least warmup + 10")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both",
                        help="run the probes eagerly, with compile=True, or both (compiled: 'both' probes only)")
    parser.add_argument("--set", choices=("gradient", "health"), default="gradient", dest="probe_set",
                        help="the gradient probes (default) or issue 32's training-health probes")
    parser.add_argument("--accumulate", type=int, default=1,
                        help="accumulate_grad_batches of every run, bare included (GradientNoiseScaleMonitor needs "
                             ">= 2 on one device); --steps counts optimiser steps")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for every run (default: PyTorch's default)")
    add_output_argument(parser)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.short_steps, args.warmup, args.repeats, args.every = 14, 12, 2, 1, [1]
        args.compile, args.no_tensorboard = "off", True
        if args.probe_set == "health":
            args.accumulate = 2
    if args.batch_size is None:
        args.batch_size = 16 if args.model == "transformer" else 128
    if args.baseline:
        load_baseline(args.baseline)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with output_dir(args.output) as root:
        measure(args, root)


def measure(args: argparse.Namespace, root: str) -> None:
    short = args.short_steps or max(args.steps // 3, args.warmup + 10)
    if not args.warmup + 2 <= short < args.steps:
        raise SystemExit(f"need warmup + 2 <= short steps ({short}) < steps ({args.steps})")
    n = args.batch_size * args.steps * args.accumulate
    data = make_data(args.model, n)
    kinds = {"off": ["stats", "dynamics", "both"], "on": ["stats+compile", "dynamics+compile", "both+compile"],
             "both": ["stats", "dynamics", "both", "both+compile"]}[args.compile]
    if args.probe_set == "health":
        kinds = [*HEALTH, "health"]
    if "old" in PROBES:  # before/after side by side: the old version's "both" rows beside this one's
        kinds = kinds + [f"old:{k}" for k in kinds if k.startswith("both")]
    configs = [("bare", 0)] + [(c, e) for e in args.every for c in kinds]
    lengths = (args.steps, short)
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    cpu_times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    hooks: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    hook_cpu: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    epoch_ends: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    fits: dict[tuple[tuple[str, int], int], list[float]] = {(c, s): [] for c in configs for s in lengths}
    compile_first: dict[tuple[str, int], float] = {}
    held: dict[tuple[str, int], int] = {}
    compared: dict[tuple[str, int], int] = {}
    rng = random.Random(0)
    for _ in range(args.repeats):
        order = [(c, s) for c in configs for s in lengths]
        rng.shuffle(order)
        for config, steps in order:
            timer = run(*config, steps, args.warmup, args.batch_size, data, not args.no_tensorboard, root,
                        args.model, args.accumulate)
            fits[config, steps].append(timer.fit_seconds)
            compile_first.setdefault(config, timer.compile_seconds)
            if steps != args.steps:
                continue
            times[config].append((timer.end - timer.start) / (args.steps - args.warmup))
            cpu_times[config].append((timer.cpu_end - timer.cpu_start) / (args.steps - args.warmup))
            hooks[config].append(timer.hook_seconds / (args.steps - args.warmup))
            hook_cpu[config].append(timer.hook_cpu_seconds / (args.steps - args.warmup))
            epoch_ends[config].append(timer.epoch_end_seconds)
            held[config] = timer.held_bytes
            compared[config] = timer.compared_bytes
    bare = times[("bare", 0)]
    bare_step = statistics.median(bare)
    model = make_model(args.model)
    entries = sum(p.numel() for p in model.parameters())

    def marginal(config: tuple[str, int], repeat: int) -> float:
        return (fits[config, args.steps][repeat] - fits[config, short][repeat]) / (args.steps - short)

    print(f"{type(model).__name__} ({entries:,} parameters, {len(list(model.parameters()))} tensors), "
          f"batch {args.batch_size}, {args.steps} (long) and {short} (short) steps x "
          f"{args.repeats} repeats, {torch.get_num_threads()} threads, accumulate_grad_batches {args.accumulate}, "
          f"logger: {'TensorBoard' if not args.no_tensorboard else 'none'}")
    bare_marginal = statistics.median(marginal(("bare", 0), r) for r in range(args.repeats))
    bare_cpu = statistics.median(cpu_times[("bare", 0)])
    from lightning_probes.functional import _native

    print(f"C kernels ({'loaded' if _native.library() is not None else 'unavailable: eager torch'}): "
          f"{_native.build_seconds():.2f} s to build or load, once per process (in the first run's first step)")
    print(f"bare step: median {bare_step * 1e3:.2f} ms wall, {bare_cpu * 1e3:.2f} ms CPU (steady state); "
          f"marginal {bare_marginal * 1e3:.2f} ms wall (long minus short)")
    print("| probe | every_n_steps | ratio to bare (wall) | ratio to bare (CPU) | target "
          "| ms per step in probe hooks (wall / CPU) | 1 + hook CPU / bare CPU step "
          "| marginal ms per step over bare (wall) | one-off s | compile s (first run) | epoch-end s (figures) "
          "| bytes held between steps (per entry) | bytes held during a compared step (per entry) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for config in configs[1:]:
        ratios = [t / b for t, b in zip(times[config], bare)]
        cpu_ratios = [t / b for t, b in zip(cpu_times[config], cpu_times[("bare", 0)])]
        hook_ms = statistics.median(hooks[config]) * 1e3
        hook_cpu_ms = statistics.median(hook_cpu[config]) * 1e3
        extra = [marginal(config, r) - marginal(("bare", 0), r) for r in range(args.repeats)]
        one_off = [fits[config, short][r] - fits[("bare", 0), short][r] - short * extra[r]
                   for r in range(args.repeats)]
        target = TARGETS.get((args.model, config[1], "compile" in config[0])) \
            if config[0].startswith("both") else (1.03 if config == ("health", 0) else None)
        print(f"| {config[0]} | {config[1] or 'default'} | {statistics.median(ratios):.3f}x | "
              f"{statistics.median(cpu_ratios):.3f}x | {'-' if target is None else f'<= {target:.2f}x'} | "
              f"{hook_ms:.2f} / {hook_cpu_ms:.2f} | {1 + hook_cpu_ms / (bare_cpu * 1e3):.3f}x | "
              f"{statistics.median(extra) * 1e3:.2f} | {statistics.median(one_off):.2f} | "
              f"{compile_first[config]:.1f} | {statistics.median(epoch_ends[config]):.2f} | "
              f"{held[config]:,} ({held[config] / entries:.2f}) | "
              f"{compared[config]:,} ({compared[config] / entries:.2f}) |")

if __name__ == "__main__":
    main()
