"""The edge of stability on real MNIST: `CurvatureMonitor`'s ``lambda_max`` against ``2 / lr`` over training.

Plain SGD (no momentum, no weight decay) at a constant learning rate on an MLP (784-200-200-10, tanh, no batch
norm), large batches on a seeded subset of MNIST's training split, so that the run is close to gradient descent:
Cohen et al. (2021) found that the sharpness (the largest Hessian eigenvalue of the training loss) first rises
("progressive sharpening") and then hovers at ``2 / lr``, where gradient descent on a quadratic stops being
stable. `CurvatureMonitor` measures it on its fixed probe batch every ``--every`` steps; the figure shows
``lambda_max`` with its Lanczos residual, the line ``2 / lr``, the probe loss and Cockpit's alpha (where each
step lands on the quadratic along it: 1 is "on the other side, as high as it started", the edge along the step).

    nice -n 10 python benchmarks/edge_of_stability.py --threads 1 --data_dir ../shared/data \\
        --figure docs/images/edge_of_stability.png

``--smoke`` runs a few steps on random MNIST-shaped data (no data needed); everything goes under ``--output``
unless ``--figure`` names another path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from _common import add_output_argument, add_smoke_argument, add_threads_argument, apply_smoke, output_dir, quiet
from _common import set_threads as _set_threads
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_probes as lp


class TanhMLP(pl.LightningModule):
    def __init__(self, lr: float, width: int = 200) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def mnist_subset(data_dir: Optional[str], size: int, seed: int = 0) -> TensorDataset:
    """``size`` seeded training images of MNIST, normalised; random MNIST-shaped data without ``data_dir``."""
    g = torch.Generator().manual_seed(seed)
    if data_dir is None:
        return TensorDataset(torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g))
    from torchvision.datasets import MNIST

    train = MNIST(data_dir, train=True, download=False)
    index = torch.randperm(len(train.data), generator=g)[:size]
    x = (train.data[index].float().unsqueeze(1) / 255.0 - 0.1307) / 0.3081
    return TensorDataset(x, train.targets[index].long())


def figure(records: list[dict[str, Any]], lr: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(3, 1, figsize=(7.0, 6.4), sharex=True, gridspec_kw={"height_ratios": [2.2, 1, 1]})
    lam = [r["lambda_max"] for r in records]
    axes[0].plot(steps, lam, color="C0", lw=1.4, label=r"$\lambda_{max}$ (Lanczos, probe batch)")
    axes[0].axhline(2.0 / lr, color="C3", ls="--", lw=1.2, label=f"2 / lr = {2.0 / lr:g}")
    axes[0].set_ylabel("sharpness")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_title(title, fontsize=9)
    axes[1].plot(steps, [r["loss"] for r in records], color="C2", lw=1.2)
    axes[1].set_ylabel("probe loss")
    axes[1].set_yscale("log")
    alpha = [(s, r["alpha"]) for s, r in zip(steps, records) if r.get("alpha") is not None]
    axes[2].plot([s for s, _ in alpha], [a for _, a in alpha], ".", color="C1", ms=3)
    axes[2].axhline(1.0, color="C3", ls="--", lw=1.0)
    axes[2].axhline(0.0, color="0.6", lw=0.8)
    off = sum(1 for _, a in alpha if not -2.0 <= a <= 4.0)
    axes[2].set_ylim(-2.0, 4.0)
    axes[2].set_ylabel(r"alpha")
    if off:
        axes[2].text(0.99, 0.95, f"{off} of {len(alpha)} off scale", transform=axes[2].transAxes, ha="right",
                     va="top", fontsize=7, color="0.4")
    axes[2].set_xlabel("optimiser step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="holds MNIST/raw (e.g. ../shared/data); default random data")
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--every", type=int, default=10, help="CurvatureMonitor's every_n_steps")
    parser.add_argument("--num-samples", type=int, default=1000, help="CurvatureMonitor's probe batch")
    parser.add_argument("--lanczos-iters", type=int, default=15)
    parser.add_argument("--figure", default=None, help="the PNG (default <output>/edge_of_stability.png)")
    add_threads_argument(parser)
    add_output_argument(parser)
    add_smoke_argument(parser)
    args = parser.parse_args(argv)
    args = apply_smoke(args, data_dir=None, train_size=64, batch_size=32, epochs=2, every=1, num_samples=16,
                       lanczos_iters=4)
    _set_threads(args.threads)
    quiet()
    with output_dir(args.output) as out:
        pl.seed_everything(0)
        data = mnist_subset(args.data_dir, args.train_size)
        probe = lp.CurvatureMonitor(every_n_steps=args.every, num_samples=args.num_samples,
                                    lanczos_iters=args.lanczos_iters, trace_samples=4, output_dir=out)
        trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=out, callbacks=[probe], num_sanity_val_steps=0)
        start = time.perf_counter()
        trainer.fit(TanhMLP(args.lr), DataLoader(data, batch_size=args.batch_size, shuffle=True,
                                                 generator=torch.Generator().manual_seed(0)))
        seconds = time.perf_counter() - start
        records = [r for r in (json.loads(line) for line in open(os.path.join(out, "curvature.jsonl")))
                   if "lambda_max" in r]
        source = f"MNIST, {args.train_size} training images" if args.data_dir else "random MNIST-shaped data"
        title = (f"SGD lr={args.lr:g}, batch {args.batch_size}, {source}; MLP 784-200-200-10 tanh; "
                 f"probe batch {records[0]['num_samples']}")
        path = args.figure or os.path.join(out, "edge_of_stability.png")
        figure(records, args.lr, path, title)
        two = 2.0 / args.lr
        first = next((r["step"] for r in records if r["lambda_max"] >= 0.9 * two), None)
        tail = records[len(records) * 2 // 3:]
        print(f"{len(records)} analyses in {seconds:.0f} s; 2/lr = {two:g}")
        lam = [r["lambda_max"] for r in records]
        last = sorted(r["lambda_max"] for r in tail)
        print(f"lambda_max: first {lam[0]:.3f} (step 0), max {max(lam):.3f}, first >= 0.9 * 2/lr at step {first}; "
              f"last third median {last[len(last) // 2]:.3f} (min {last[0]:.3f}, max {last[-1]:.3f}); "
              f"final probe loss {records[-1]['loss']:.4f}")
        alphas = sorted(r["alpha"] for r in tail if r.get("alpha") is not None)
        if alphas:
            print(f"alpha over the last third: median {alphas[len(alphas) // 2]:.3f}")
        for r in records[:: max(1, len(records) // 12)]:
            print(f"  step {r['step']:5d}  lambda_max {r['lambda_max']:8.3f}  ratio {r['sharpness_ratio']:.3f}  "
                  f"loss {r['loss']:.4f}  alpha {r.get('alpha')}")
        print(f"figure: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
