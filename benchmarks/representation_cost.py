"""Cost of one pass of each representation probe (LayerCorrelationMonitor, ActivationStatsMonitor,
AlignmentMonitor; 512 probe samples, default layers) for the MLP, LeNet5 and BaselineNet, as a share of a bare
MNIST training epoch of the MLP, against the target (LayerCorrelationMonitor + ActivationStatsMonitor <= 5% of
the epoch, figures included). Random data of the real shapes; figures timed apart.

    python benchmarks/representation_cost.py
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import pytorch_lightning as pl
import torch
from _common import Stopwatch, add_output_argument, bare_trainer, output_dir, quiet, random_loader, timed_method

from lightning_probes import ActivationStatsMonitor, AlignmentMonitor, LayerCorrelationMonitor
from lightning_probes.models import MLP, BaselineNet, LeNet5


class EpochTimer(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def one_pass(probe_cls, model_cls, shape, samples: int, repeats: int, root: str) -> dict:
    passes, figures, rss = [], [], []
    for _ in range(repeats):
        probe = probe_cls(num_samples=samples, every_n_epochs=1000)
        analysis, drawing = Stopwatch(), Stopwatch()
        timed_method(probe, "analyse", analysis)
        timed_method(probe, "save_figure", drawing)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        trainer = bare_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[probe],
                               default_root_dir=root)
        trainer.fit(model_cls(), random_loader(64, shape, 64), random_loader(samples, shape, 128))
        passes.append(analysis.seconds - drawing.seconds)
        figures.append(drawing.seconds)
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    return {"pass_s": statistics.median(passes), "figures_s": statistics.median(figures),
            "rss_growth_mb": max(rss) / 1024, "layers": len(probe._modules)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epoch-samples", type=int, default=54000, help="MNIST training split size")
    add_output_argument(parser)
    args = parser.parse_args()
    quiet()
    with output_dir(args.output) as root:
        measure(args, root)


def measure(args: argparse.Namespace, root: str) -> None:
    timer = EpochTimer()
    trainer = bare_trainer(max_epochs=1, limit_val_batches=0, callbacks=[timer], default_root_dir=root)
    trainer.fit(MLP(), random_loader(args.epoch_samples, (1, 28, 28), 128, shuffle=True))
    epoch = timer.seconds
    print(f"{torch.get_num_threads()} threads; MLP training epoch on {args.epoch_samples} MNIST-shaped samples "
          f"(batch 128): {epoch:.2f} s")
    print("| probe | model | layers | pass s (no figures) | figures s | share of MNIST MLP epoch (pass / pass+figures) "
          "| peak RSS growth MB |")
    print("|---|---|---|---|---|---|---|")
    models = (("MLP", MLP, (1, 28, 28)), ("LeNet5", LeNet5, (1, 28, 28)), ("BaselineNet", BaselineNet, (3, 32, 32)))
    results = {}
    for probe_cls in (LayerCorrelationMonitor, ActivationStatsMonitor, AlignmentMonitor):
        for name, cls, shape in models:
            r = results[probe_cls, name] = one_pass(probe_cls, cls, shape, args.samples, args.repeats, root)
            share = f"{r['pass_s'] / epoch:.1%} / {(r['pass_s'] + r['figures_s']) / epoch:.1%}"
            print(f"| {probe_cls.__name__} | {name} | {r['layers']} | {r['pass_s']:.3f} | {r['figures_s']:.3f} | "
                  f"{share} | {r['rss_growth_mb']:.0f} |")

    print("\nTarget: one LayerCorrelationMonitor + ActivationStatsMonitor pass <= 5% of the epoch, figures included")
    for name, _, _ in models:
        pair = [results[LayerCorrelationMonitor, name], results[ActivationStatsMonitor, name]]
        passes, figures = sum(r["pass_s"] for r in pair), sum(r["figures_s"] for r in pair)
        verdict = "met" if (passes + figures) / epoch <= 0.05 else "missed"
        print(f"  {name}: {passes / epoch:.1%} without figures, {(passes + figures) / epoch:.1%} with: {verdict}")


if __name__ == "__main__":
    main()
