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


def probe_fit(probe_cls, model: str, samples: int, root: str) -> dict:
    """One fit with analyses at epochs 0, 1 and 2: seconds of each pass (figures excluded) and of each drawing of
    the figure set."""
    probe = probe_cls(num_samples=samples, every_n_epochs=1)
    passes: list[float] = []
    draws: dict[object, float] = {}
    state = {"in_pass": None}
    analyse, save_figure = probe.analyse, probe.save_figure

    def timed_analyse(*args, **kwargs):
        state["in_pass"] = len(passes)
        start = time.perf_counter()
        try:
            return analyse(*args, **kwargs)
        finally:
            passes.append(time.perf_counter() - start)
            state["in_pass"] = None

    def timed_save_figure(*args, **kwargs):
        watch = Stopwatch()
        with watch.timing():
            save_figure(*args, **kwargs)
        key = state["in_pass"] if state["in_pass"] is not None else "fit_end"
        draws[key] = draws.get(key, 0.0) + watch.seconds

    probe.analyse, probe.save_figure = timed_analyse, timed_save_figure
    cls, shape = MODELS[model]
    trainer = bare_trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, callbacks=[probe],
                           default_root_dir=root)
    trainer.fit(cls(), random_loader(64, shape, 64), random_loader(samples, shape, 128))
    net = [p - draws.get(i, 0.0) for i, p in enumerate(passes)]
    return {"first_s": net[0], "marginal_s": statistics.median(net[1:]), "draw_s": max(draws.values(), default=0.0),
            "every": getattr(probe, "plot_every_n_epochs", 1), "layers": len(probe._modules)}


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
    results: dict[tuple, list] = {}
    rng = random.Random(0)
    for _ in range(args.repeats):
        order = jobs[:]
        rng.shuffle(order)
        for kind, probe_cls, model in order:
            if kind == "bare":
                results.setdefault(("bare",), []).append(bare_step(args.steps, root))
            else:
                results.setdefault((probe_cls, model), []).append(probe_fit(probe_cls, model, args.samples, root))
    steps = math.ceil(args.epoch_samples / 128)
    epoch = statistics.median(results["bare",]) * steps
    each = ", ".join(f"{s * steps:.1f}" for s in results["bare",])
    print(f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats, medians. Bare MLP epoch on "
          f"{args.epoch_samples} MNIST-shaped samples (batch 128): {epoch:.2f} s ({steps} steps x "
          f"{epoch / steps * 1000:.1f} ms; per repeat: {each} s)")
    print("| probe | model | layers | marginal pass s | one-off s (first pass extra) | figures s per drawing | "
          "drawn every n passes | share of the epoch: pass / with figures at that cadence / drawn every pass |")
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for probe_cls in probes:
        for model in args.models:
            runs = results[probe_cls, model]
            r = {key: statistics.median(run[key] for run in runs) for key in ("first_s", "marginal_s", "draw_s")}
            r["every"], r["layers"] = runs[0]["every"], runs[0]["layers"]
            r["per_pass_figures"] = r["draw_s"] / r["every"] if r["every"] > 0 else 0.0
            summary[probe_cls.__name__, model] = r
            print(f"| {probe_cls.__name__} | {model} | {r['layers']} | {r['marginal_s']:.3f} | "
                  f"{r['first_s'] - r['marginal_s']:.3f} | {r['draw_s']:.3f} | {r['every'] or 'never'} | "
                  f"{r['marginal_s'] / epoch:.1%} / {(r['marginal_s'] + r['per_pass_figures']) / epoch:.1%} / "
                  f"{(r['marginal_s'] + r['draw_s']) / epoch:.1%} |")
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
