"""Overhead of ConfidenceMonitor on a validation epoch of the MNIST MLP (6,000 MNIST-shaped samples), and
seconds per NoiseRobustnessMonitor analysis at its defaults (200 samples x 50 draws). Interleaved repeats,
median ratios against a bare validation run in the same process.

ConfidenceMonitor variants: ``accumulate`` (no figure, no heatmap), ``epoch without figures`` (what a fit's
epoch costs between figure epochs: ``plot_every_n_epochs=0``, the colour-mapped heatmap computed) and ``with
figures`` (its three matplotlib figures drawn, as on a figure epoch or in ``validate``).

    python benchmarks/prediction_cost.py
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from _common import (
    Stopwatch,
    add_output_argument,
    add_smoke_argument,
    apply_smoke,
    bare_trainer,
    output_dir,
    quiet,
    random_loader,
    timed_method,
)

from lightning_probes import ConfidenceMonitor, NoiseRobustnessMonitor
from lightning_probes.models import MLP


def validate(model, loader, probe, root: str) -> float:
    trainer = bare_trainer(callbacks=[] if probe is None else [probe], default_root_dir=root)
    start = time.perf_counter()
    trainer.validate(model, loader, verbose=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--noise-repeats", type=int, default=3, help="NoiseRobustnessMonitor fits timed")
    parser.add_argument("--noise-samples", type=int, default=200, help="NoiseRobustnessMonitor num_samples")
    parser.add_argument("--noise-draws", type=int, default=50, help="NoiseRobustnessMonitor num_draws")
    add_output_argument(parser)
    add_smoke_argument(parser)
    args = apply_smoke(parser.parse_args(), samples=128, repeats=1, noise_repeats=1, noise_samples=16,
                       noise_draws=4)
    quiet()
    with output_dir(args.output) as root:
        measure(args, root)


def measure(args: argparse.Namespace, root: str) -> None:
    model = MLP()
    loader = random_loader(args.samples, (1, 28, 28), 128)
    validate(model, loader, None, root)  # warm-up
    times: dict[str, list[float]] = {"bare": [], "accumulate": [], "epoch without figures": [], "with figures": []}
    for _ in range(args.repeats):
        order = list(times)
        random.shuffle(order)
        for kind in order:
            probe = None
            if kind != "bare":
                every = 0 if kind == "epoch without figures" else 1
                probe = ConfidenceMonitor(output_dir=f"{root}/confidence", plot_every_n_epochs=every)
                if kind == "accumulate":
                    probe._plot = lambda *a, **k: None
            times[kind].append(validate(model, loader, probe, root))
    bare = times["bare"]
    print(f"{torch.get_num_threads()} threads; validation of the MLP on {args.samples} MNIST-shaped samples: "
          f"bare median {statistics.median(bare):.3f} s")
    print("| ConfidenceMonitor | median ratio to bare |")
    print("|---|---|")
    for kind in ("accumulate", "epoch without figures", "with figures"):
        ratios = [t / b for t, b in zip(times[kind], bare)]
        print(f"| {kind} | {statistics.median(ratios):.3f}x |")

    seconds, drawing = [], []
    for _ in range(args.noise_repeats):
        probe = NoiseRobustnessMonitor(num_samples=args.noise_samples, num_draws=args.noise_draws,
                                       output_dir=f"{root}/noise")
        analysis, figures = Stopwatch(), Stopwatch()
        timed_method(probe, "analyse", analysis)
        timed_method(probe, "save_figure", figures)
        trainer = bare_trainer(max_epochs=1, limit_train_batches=1, callbacks=[probe], default_root_dir=root)
        trainer.fit(MLP(), random_loader(64, (1, 28, 28), 64), random_loader(1000, (1, 28, 28), 128))
        seconds.append(analysis.seconds)
        drawing.append(figures.seconds)  # drawn at the end of the fit (plot_every_n_epochs=10 by default)
    print(f"NoiseRobustnessMonitor ({args.noise_samples} samples x {args.noise_draws} draws, MLP; defaults 200 x 50): "
          f"{statistics.median(seconds):.3f} s "
          f"per analysis, and {statistics.median(drawing):.3f} s per drawing of its figure (every "
          f"{probe.plot_every_n_epochs} epochs and at the end of the fit)")


if __name__ == "__main__":
    main()
