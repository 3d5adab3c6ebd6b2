"""Overhead of ConfidenceMonitor on a validation epoch of the MNIST MLP (6,000 MNIST-shaped samples), and
seconds per NoiseRobustnessMonitor analysis at its defaults (200 samples x 50 draws). Interleaved repeats,
median ratios against a bare validation run in the same process.

    python benchmarks/prediction_cost.py
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from _common import Stopwatch, bare_trainer, quiet, random_loader, timed_method

from lightning_probes import ConfidenceMonitor, NoiseRobustnessMonitor
from models import MLP


def validate(model, loader, probe) -> float:
    trainer = bare_trainer(callbacks=[] if probe is None else [probe], default_root_dir="/tmp/lp_bench")
    start = time.perf_counter()
    trainer.validate(model, loader, verbose=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    quiet()
    model = MLP()
    loader = random_loader(args.samples, (1, 28, 28), 128)
    validate(model, loader, None)  # warm-up
    times: dict[str, list[float]] = {"bare": [], "accumulate": [], "with figures": []}
    for _ in range(args.repeats):
        order = list(times)
        random.shuffle(order)
        for kind in order:
            probe = None
            if kind != "bare":
                probe = ConfidenceMonitor(output_dir="/tmp/lp_bench/confidence")
                if kind == "accumulate":
                    probe._plot = lambda *a, **k: None
            times[kind].append(validate(model, loader, probe))
    bare = times["bare"]
    print(f"{torch.get_num_threads()} threads; validation of the MLP on {args.samples} MNIST-shaped samples: "
          f"bare median {statistics.median(bare):.3f} s")
    print("| ConfidenceMonitor | median ratio to bare |")
    print("|---|---|")
    for kind in ("accumulate", "with figures"):
        ratios = [t / b for t, b in zip(times[kind], bare)]
        print(f"| {kind} | {statistics.median(ratios):.3f}x |")

    seconds, drawing = [], []
    for _ in range(3):
        probe = NoiseRobustnessMonitor(output_dir="/tmp/lp_bench/noise")
        analysis, figures = Stopwatch(), Stopwatch()
        timed_method(probe, "_analyse", analysis)
        timed_method(probe, "save_figure", figures)
        trainer = bare_trainer(max_epochs=1, limit_train_batches=1, callbacks=[probe], default_root_dir="/tmp/lp_bench")
        trainer.fit(MLP(), random_loader(64, (1, 28, 28), 64), random_loader(1000, (1, 28, 28), 128))
        seconds.append(analysis.seconds)
        drawing.append(figures.seconds)
    print(f"NoiseRobustnessMonitor at defaults (200 samples x 50 draws, MLP): {statistics.median(seconds):.3f} s "
          f"per analysis, plus {statistics.median(drawing):.3f} s for its figure")


if __name__ == "__main__":
    main()
