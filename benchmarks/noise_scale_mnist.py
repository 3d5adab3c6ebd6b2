"""The gradient noise scale ``B_simple`` of an MLP trained on real MNIST, measured by `GradientNoiseScaleMonitor`
from gradient accumulation, against a direct per-sample estimate at the end of every epoch.

McCandlish et al. (2018) report a critical batch size of the order of 1,000 for MNIST (a public reproduction found
``B_simple`` about 876, against about 900 in the paper), growing as the loss falls. This trains a plain MLP
(784-512-256-128-10, ReLU, no batch norm: batch statistics would couple the samples the estimate assumes
independent) with SGD on micro-batches of ``--micro`` samples accumulated ``--accumulate`` times (``B_small =
micro``, ``B_big = micro * accumulate``), measures at every ``--every`` steps, and prints the probe's records over
training: the per-interval estimates and the EMAs. At the start and at every epoch end a callback computes the same
two terms directly from per-sample gradients (`lightning_probes.functional.per_sample`) of ``--check-samples``
fixed training samples, at the weights of that moment::

    tr(Sigma) = n / (n - 1) * (mean_i |g_i|^2 - |mean_i g_i|^2),   |G|^2 = |mean_i g_i|^2 - tr(Sigma) / n

Usage::

    python benchmarks/noise_scale_mnist.py --data_dir ../shared/data --output DIR   # about 5 minutes on 2 cores
    python benchmarks/noise_scale_mnist.py --smoke --output DIR                       # seconds: that it runs

``DIR/probes/gradient_noise_scale.jsonl`` keeps the probe's records, ``DIR/direct.json`` the direct estimates and
``DIR/table.md`` the printed table and ``DIR/noise_scale.png`` the figure of the probe's docs page.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks._common import (  # noqa: E402
    add_output_argument,
    add_smoke_argument,
    add_threads_argument,
    apply_smoke,
    bare_trainer,
    output_dir,
    quiet,
    random_loader,
    set_threads,
)
from lightning_probes import GradientNoiseScaleMonitor  # noqa: E402
from lightning_probes.functional.per_sample import per_sample_gradients  # noqa: E402
from lightning_probes.io import read_jsonl  # noqa: E402


class PlainMLP(pl.LightningModule):
    """784-512-256-128-10 with ReLU, cross-entropy (the mean over the micro-batch), plain SGD."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                                 nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DirectNoiseScale(pl.Callback):
    """``|G|^2``, ``tr(Sigma)`` and their ratio from per-sample gradients of fixed samples, at the start of training
    and at every epoch end (the model in eval mode meanwhile; no batch statistics in this model anyway)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 128) -> None:
        self.x, self.y, self.chunk = x, y, chunk
        self.rows: list[dict] = []

    def _measure(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        net = module.net
        was_training = net.training
        net.eval()
        total, square, n = None, 0.0, len(self.x)
        losses = 0.0
        for grads, loss in per_sample_gradients(net, (self.x, self.y), chunk_size=self.chunk):
            flat = torch.cat([g.flatten(1) for g in grads.values()], dim=1).double()  # (c, D)
            total = flat.sum(0) if total is None else total + flat.sum(0)
            square += float(flat.square().sum())
            losses += float(loss.sum())
        net.train(was_training)
        mean = total / n
        mean_sq = float(mean.square().sum())
        trace = n / (n - 1) * (square / n - mean_sq)
        grad_sq = mean_sq - trace / n
        self.rows.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "loss": losses / n,
                          "grad_sq": grad_sq, "trace_sigma": trace,
                          "b_simple": trace / grad_sq if grad_sq > 0 else None})

    def on_train_start(self, trainer, pl_module):
        self._measure(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._measure(trainer, pl_module)


def loaders(args: argparse.Namespace) -> tuple[torch.utils.data.DataLoader, torch.Tensor, torch.Tensor]:
    """The training loader (shuffled, normalised MNIST or random MNIST-shaped tensors with --smoke) and the fixed
    samples of the direct check."""
    if args.smoke:
        loader = random_loader(args.samples, (1, 28, 28), args.micro, shuffle=True)
        x, y = loader.dataset.tensors
        return loader, x[:args.check_samples], y[:args.check_samples]
    from torchvision.datasets import MNIST

    data = MNIST(args.data_dir, train=True, download=False)
    x = ((data.data.float() / 255.0 - 0.1307) / 0.3081).unsqueeze(1)
    y = data.targets.long()
    if args.samples < len(x):
        x, y = x[:args.samples], y[:args.samples]
    g = torch.Generator().manual_seed(0)
    check = torch.randperm(len(x), generator=g)[:args.check_samples]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.micro, shuffle=True,
                                         generator=torch.Generator().manual_seed(1), drop_last=True)
    return loader, x[check], y[check]


def fmt(value, digits: int = 0) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data", help="Holds MNIST/raw/ (the four IDX files).")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=60000, help="training samples used (the first n)")
    parser.add_argument("--micro", type=int, default=32, help="samples per micro-batch (B_small)")
    parser.add_argument("--accumulate", type=int, default=8, help="micro-batches per step (B_big = micro * this)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--every", type=int, default=1, help="measure every n steps")
    parser.add_argument("--log-every", type=int, default=25, help="a record every n steps")
    parser.add_argument("--ema", type=float, default=0.95, help="EMA decay per measurement")
    parser.add_argument("--check-samples", type=int, default=4096, help="samples of the direct per-sample check")
    add_smoke_argument(parser)
    add_output_argument(parser)
    add_threads_argument(parser)
    args = apply_smoke(parser.parse_args(), epochs=1, samples=256, micro=8, accumulate=4, log_every=2,
                       check_samples=32)
    set_threads(args.threads)
    quiet()
    pl.seed_everything(0, verbose=False)
    loader, check_x, check_y = loaders(args)
    with output_dir(args.output) as root:
        probe = GradientNoiseScaleMonitor(every_n_steps=args.every, log_every_n_steps=args.log_every,
                                          ema_decay=args.ema, output_dir=os.path.join(root, "probes"))
        direct = DirectNoiseScale(check_x, check_y)
        trainer = bare_trainer(max_epochs=args.epochs, accumulate_grad_batches=args.accumulate,
                               callbacks=[probe, direct], default_root_dir=root, log_every_n_steps=args.log_every)
        trainer.fit(PlainMLP(args.lr), loader)
        records = [r for r in read_jsonl(probe.jsonl_path) if "probe_status" not in r]
        lines = [f"MNIST {'(smoke: random tensors)' if args.smoke else ''} plain MLP, SGD lr {args.lr}, "
                 f"B_small = {args.micro}, B_big = {args.micro * args.accumulate}, measured every {args.every} "
                 f"step(s), EMA decay {args.ema}, {trainer.global_step} steps",
                 "", "| step | epoch | measurements | |G|^2 (interval) | tr(Sigma) (interval) | B_simple (interval) | "
                 "|G|^2 EMA | tr(Sigma) EMA | B_simple EMA |", "|---|---|---|---|---|---|---|---|---|"]
        for r in records:
            lines.append(f"| {r['step']} | {r['epoch']} | {r['measurements']} | {fmt(r['grad_sq'], 4)} | "
                         f"{fmt(r['trace_sigma'], 2)} | {fmt(r['b_simple'])} | {fmt(r['grad_sq_ema'], 4)} | "
                         f"{fmt(r['trace_sigma_ema'], 2)} | {fmt(r['b_simple_ema'])} |")
        lines += ["", f"Direct per-sample estimate on {len(check_x)} fixed training samples:", "",
                  "| step | epoch | loss | |G|^2 | tr(Sigma) | B_simple |", "|---|---|---|---|---|---|"]
        for r in direct.rows:
            lines.append(f"| {r['step']} | {r['epoch']} | {r['loss']:.3f} | {fmt(r['grad_sq'], 4)} | "
                         f"{fmt(r['trace_sigma'], 2)} | {fmt(r['b_simple'])} |")
        text = "\n".join(lines)
        print(text)
        with open(os.path.join(root, "table.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(root, "direct.json"), "w") as f:
            json.dump(direct.rows, f, indent=1)
        figure(records, direct.rows, trainer.num_training_batches // args.accumulate).savefig(
            os.path.join(root, "noise_scale.png"), dpi=110, bbox_inches="tight")


def figure(records: list[dict], direct: list[dict], steps_per_epoch: int):
    """``B_simple`` over training: the probe's per-interval estimates (dots), its EMA (line), the direct
    per-sample estimates (crosses) and the epoch boundaries; and the two terms' EMAs on a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def column(rows: list[dict], key: str) -> list[float]:
        return [math.nan if r.get(key) is None else r[key] for r in rows]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    step = [r["step"] for r in records]
    top.scatter(step, column(records, "b_simple"), s=8, color="tab:blue", alpha=0.5,
                label="B_simple (per record interval)")
    top.plot(step, column(records, "b_simple_ema"), color="tab:blue", lw=1.5, label="B_simple EMA")
    top.scatter([r["step"] for r in direct], column(direct, "b_simple"), marker="x", s=50, color="tab:red",
                zorder=3, label="direct per-sample estimate")
    top.set_yscale("log")
    top.set_ylabel("B_simple (samples)")
    top.legend(fontsize=8)
    bottom.plot(step, column(records, "grad_sq_ema"), label="|G|^2 EMA")
    bottom.plot(step, column(records, "trace_sigma_ema"), label="tr(Sigma) EMA")
    bottom.set_yscale("log")
    bottom.set_xlabel("optimiser step")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        for epoch in range(1, (step[-1] if step else 0) // max(1, steps_per_epoch) + 1):
            ax.axvline(epoch * steps_per_epoch, color="0.7", lw=0.8, ls=":")
    top.set_title("Gradient noise scale of an MLP on MNIST (GradientNoiseScaleMonitor)", fontsize=10)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
