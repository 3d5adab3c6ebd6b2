"""Cost of the representation probes (LayerCorrelationMonitor, ActivationStatsMonitor, AlignmentMonitor; 512 probe
samples, default layers) for the MLP, LeNet5 and BaselineNet, as a share of a bare MNIST training epoch of the MLP,
against the target: one LayerCorrelationMonitor + ActivationStatsMonitor pass <= 5% of the epoch, figures included.

Everything runs in this one process, in interleaved repeats (a shuffled order per repeat), and the medians are
reported. The bare epoch is the MLP's time per training step (after a warm-up) times the steps of a 54,000-sample
epoch at batch 128. Each probe fit analyses three times (epochs 0, 1, 2): the marginal pass is the median of the
second and third analyses, the one-off seconds what the first adds (probe-set collection, layer check). Figures are
timed apart, per drawing of the probe's whole set (``save_figure``), and charged per pass at the probe's default
cadence: every pass for probes without ``plot_every_n_epochs``, one pass in ``plot_every_n_epochs`` otherwise
(the draw at the end of a fit is a one-off). Random data of the real shapes; no logger (TensorBoard images are
not included).

    python benchmarks/representation_cost.py [--repeats 3] [--threads 1] [--probes LayerCorrelationMonitor ...]
    python benchmarks/representation_cost.py --smoke --output DIR   # seconds: that it runs
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import pytorch_lightning as pl
import torch
from _common import (
    Stopwatch,
    add_output_argument,
    add_threads_argument,
    bare_trainer,
    output_dir,
    quiet,
    random_loader,
    set_threads,
)

import lightning_probes
from lightning_probes.models import MLP, BaselineNet, LeNet5

TARGET = 0.05
MODELS = {"MLP": (MLP, (1, 28, 28)), "LeNet5": (LeNet5, (1, 28, 28)), "BaselineNet": (BaselineNet, (3, 32, 32))}


class StepTimer(pl.Callback):
    """Seconds per training step after ``warmup`` steps."""

    def __init__(self, warmup: int = 5) -> None:
        self.warmup, self.start, self.steps = warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = (time.perf_counter() - self.start) / (trainer.num_training_batches - self.warmup)


def bare_step(steps: int, root: str) -> float:
    timer = StepTimer()
    trainer = bare_trainer(max_epochs=1, limit_val_batches=0, callbacks=[timer], default_root_dir=root)
    trainer.fit(MLP(), random_loader(steps * 128, (1, 28, 28), 128, shuffle=True))
    return timer.seconds


def probe_fit(probe_classes, model: str, samples: int, root: str) -> dict:
    """One fit with analyses at epochs 0, 1 and 2 with the given probes (together: one shared pass where they
    share it): per analysis, the seconds of every probe's pass summed (figures excluded; wall and CPU time), and
    the seconds of each drawing of the figure sets."""
    probes = [cls(num_samples=samples, every_n_epochs=1) for cls in probe_classes]
    passes: dict[int, list[float]] = {}
    draws: dict[object, float] = {}
    state = {"in_pass": None, "epoch_of": {}}

    for probe in probes:
        analyse, save_figure = probe.analyse, probe.save_figure

        def timed_analyse(trainer, pl_module, epoch, analyse=analyse):
            state["in_pass"] = epoch
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return analyse(trainer, pl_module, epoch)
            finally:
                wall, used = passes.setdefault(epoch, [0.0, 0.0])
                passes[epoch] = [wall + time.perf_counter() - start, used + time.process_time() - cpu]
                state["in_pass"] = None

        def timed_save_figure(*args, save_figure=save_figure, **kwargs):
            watch = Stopwatch()
            start = time.process_time()
            with watch.timing():
                save_figure(*args, **kwargs)
            key = state["in_pass"] if state["in_pass"] is not None else "fit_end"
            wall, used = draws.get(key, (0.0, 0.0))
            draws[key] = (wall + watch.seconds, used + time.process_time() - start)

        probe.analyse, probe.save_figure = timed_analyse, timed_save_figure
    cls, shape = MODELS[model]
    trainer = bare_trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, callbacks=probes,
                           default_root_dir=root)
    trainer.fit(cls(), random_loader(64, shape, 64), random_loader(samples, shape, 128))
    net = [[p[0] - draws.get(e, (0.0, 0.0))[0], p[1] - draws.get(e, (0.0, 0.0))[1]]
           for e, p in sorted(passes.items())]
    return {"first_s": net[0][0], "marginal_s": statistics.median(n[0] for n in net[1:]),
            "marginal_cpu_s": statistics.median(n[1] for n in net[1:]),
            "draw_s": max((d[0] for d in draws.values()), default=0.0),
            "every": getattr(probes[0], "plot_every_n_epochs", 1), "layers": len(probes[0]._modules)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epoch-samples", type=int, default=54000, help="MNIST training split size")
    parser.add_argument("--steps", type=int, default=80, help="training steps timed per bare measurement")
    parser.add_argument("--probes", nargs="+",
                        default=["LayerCorrelationMonitor", "ActivationStatsMonitor", "AlignmentMonitor"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--smoke", action="store_true",
                        help="that it runs: 32 samples, 1 repeat, 10 bare steps, the MLP only")
    add_output_argument(parser)
    add_threads_argument(parser)
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.repeats, args.steps, args.models = 32, 1, 10, ["MLP"]
    set_threads(args.threads)
    quiet()
    with output_dir(args.output) as root:
        measure(args, root)


def measure(args: argparse.Namespace, root: str) -> None:
    probes = [getattr(lightning_probes, name) for name in args.probes]
    jobs = [("bare", None, None)] + [("probe", p, m) for p in probes for m in args.models]
    if len(probes) > 1:
        jobs += [("together", None, m) for m in args.models]  # every probe in one fit: one shared pass
    results: dict[tuple, list] = {}
    rng = random.Random(0)
    for _ in range(args.repeats):
        order = jobs[:]
        rng.shuffle(order)
        for kind, probe_cls, model in order:
            if kind == "bare":
                results.setdefault(("bare",), []).append(bare_step(args.steps, root))
            elif kind == "together":
                results.setdefault(("together", model), []).append(probe_fit(probes, model, args.samples, root))
            else:
                results.setdefault((probe_cls, model), []).append(probe_fit([probe_cls], model, args.samples, root))
    steps = math.ceil(args.epoch_samples / 128)
    epoch = statistics.median(results["bare",]) * steps
    each = ", ".join(f"{s * steps:.1f}" for s in results["bare",])
    print(f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats, medians. Bare MLP epoch on "
          f"{args.epoch_samples} MNIST-shaped samples (batch 128): {epoch:.2f} s ({steps} steps x "
          f"{epoch / steps * 1000:.1f} ms; per repeat: {each} s)")
    print("| probe | model | layers | marginal pass s (CPU s) | one-off s (first pass extra) | figures s per drawing | "
          "drawn every n passes | share of the epoch: pass / with figures at that cadence / drawn every pass |")
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for probe_cls in probes:
        for model in args.models:
            runs = results[probe_cls, model]
            r = {key: statistics.median(run[key] for run in runs)
                 for key in ("first_s", "marginal_s", "marginal_cpu_s", "draw_s")}
            r["every"], r["layers"] = runs[0]["every"], runs[0]["layers"]
            r["per_pass_figures"] = r["draw_s"] / r["every"] if r["every"] > 0 else 0.0
            summary[probe_cls.__name__, model] = r
            print(f"| {probe_cls.__name__} | {model} | {r['layers']} | "
                  f"{r['marginal_s']:.3f} ({r['marginal_cpu_s']:.3f}) | "
                  f"{r['first_s'] - r['marginal_s']:.3f} | {r['draw_s']:.3f} | {r['every'] or 'never'} | "
                  f"{r['marginal_s'] / epoch:.1%} / {(r['marginal_s'] + r['per_pass_figures']) / epoch:.1%} / "
                  f"{(r['marginal_s'] + r['draw_s']) / epoch:.1%} |")
    if len(probes) > 1:
        print(f"\nShared pass: the {len(probes)} probes in one fit (one forward pass per analysis) against the sum of "
              "their passes run alone (figures excluded; medians of the marginal analyses)")
        print("| model | alone: summed pass s (CPU s) | together: pass s (CPU s) | together / alone wall (CPU) |")
        print("|---|---|---|---|")
        for model in args.models:
            alone = [summary[p.__name__, model] for p in probes]
            runs = results["together", model]
            wall = statistics.median(run["marginal_s"] for run in runs)
            cpu = statistics.median(run["marginal_cpu_s"] for run in runs)
            alone_wall, alone_cpu = sum(r["marginal_s"] for r in alone), sum(r["marginal_cpu_s"] for r in alone)
            print(f"| {model} | {alone_wall:.3f} ({alone_cpu:.3f}) | {wall:.3f} ({cpu:.3f}) | "
                  f"{wall / alone_wall:.2f}x ({cpu / alone_cpu:.2f}x) |")
    pair = ("LayerCorrelationMonitor", "ActivationStatsMonitor")
    if not all((p, m) in summary for p in pair for m in args.models):
        return
    print(f"\nTarget: one LayerCorrelationMonitor + ActivationStatsMonitor pass <= {TARGET:.0%} of the bare MLP epoch, "
          "figures included (at the default figure cadence; one-off seconds apart)")
    for model in args.models:
        both = [summary[p, model] for p in pair]
        passes = sum(r["marginal_s"] for r in both)
        with_figures = passes + sum(r["per_pass_figures"] for r in both)
        every_pass = passes + sum(r["draw_s"] for r in both)
        one_off = sum(r["first_s"] - r["marginal_s"] for r in both)
        verdict = "met" if with_figures / epoch <= TARGET else "missed"
        print(f"  {model}: {passes / epoch:.1%} without figures, {with_figures / epoch:.1%} with figures at the "
              f"default cadence (target {TARGET:.0%}: {verdict}); {every_pass / epoch:.1%} if drawn every pass; "
              f"one-off {one_off:.2f} s")


if __name__ == "__main__":
    main()
