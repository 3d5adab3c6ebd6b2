"""Train a small transformer on MNIST read as sequences of rows, with every training-health probe, and provoke a
loss spike to see what one looks like in them.

Each 28x28 digit is a sequence of 28 row tokens (28 pixels each) after a learned ``[CLS]`` token; four pre-norm
encoder blocks (d_model 64, 4 heads) classify it from the ``[CLS]`` output. ``accumulate_grad_batches=2``
gives `GradientNoiseScaleMonitor` its two batch sizes on one device. At ``--spike_at`` the learning rate is
multiplied by ``--spike_factor`` for ``--spike_steps`` optimiser steps: the loss and gradient-norm z-scores of
`StabilityMonitor` jump, the update/weight ratio of `GradientDynamicsMonitor` and the attention logits follow.
The run writes ``<run>/probes/*.jsonl`` and ``<run>/training_health.png`` (the panels of the docs' "What a spike
looks like"), and TensorBoard gets every scalar.

    python examples/training_health.py --data_dir ../shared/data        # about 30 s on 2 CPU cores

The docs' figure is this command's ``training_health.png`` (real MNIST, 1 epoch of 55,000 digits).
"""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

import lightning_probes as lp
from lightning_probes.datamodules import MNISTDataModule

#: StabilityMonitor's z-score threshold (its default, as OLMo's spike score).
THRESHOLD = 6.0


class RowTransformer(pl.LightningModule):
    """A digit as 28 row tokens after a ``[CLS]`` token; pre-norm encoder blocks; the class from ``[CLS]``.

    Args:
        d_model: Width of the tokens.
        layers: Encoder blocks.
        lr: AdamW learning rate.
    """

    def __init__(self, d_model: int = 64, layers: int = 4, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(28, d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.position = nn.Parameter(torch.randn(1, 29, d_model) * 0.02)
        block = nn.TransformerEncoderLayer(d_model, 4, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.embed(x.reshape(x.shape[0], 28, 28))  # (batch, 28, d_model)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), rows], dim=1) + self.position
        return self.head(self.norm(self.blocks(tokens)[:, 0]))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


class LearningRateSpike(pl.Callback):
    """Multiply every learning rate by ``factor`` for ``steps`` optimiser steps from step ``at``.

    Args:
        at: First optimiser step with the raised rate.
        factor: The multiplier.
        steps: How many steps it lasts.
    """

    def __init__(self, at: int, factor: float, steps: int) -> None:
        self.at, self.factor, self.steps = at, factor, steps
        self._base: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self._base:
            self._base = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]
        raised = self.at <= trainer.global_step < self.at + self.steps
        groups = [g for opt in trainer.optimizers for g in opt.param_groups]
        for group, base in zip(groups, self._base):
            group["lr"] = base * (self.factor if raised else 1.0)


def probes(every: int) -> list[pl.Callback]:
    """Every training-health probe, each logging every ``every`` optimiser steps."""
    return [
        # the z-scores need 50 steps of history
        lp.StabilityMonitor(every_n_steps=every, window=50, threshold=THRESHOLD),
        lp.GradientDynamicsMonitor(every_n_steps=every, init_distance=True),
        lp.ActivationOutlierMonitor(every_n_steps=every),
        lp.AttentionMonitor(every_n_steps=every),
        lp.GradientNoiseScaleMonitor(every_n_steps=every),
    ]


def main(data_dir: str, output: str = "runs/examples", max_epochs: int = 1, limit_batches: float = 1.0,
         every: int = 10, spike_at: int = 300, spike_factor: float = 30.0, spike_steps: int = 3,
         train_size: int | None = None) -> str:
    """Train with every training-health probe and a learning-rate spike; return the run directory."""
    pl.seed_everything(0)
    data = MNISTDataModule(data_dir, batch_size=64, train_size=train_size)
    trainer = pl.Trainer(max_epochs=max_epochs, limit_train_batches=limit_batches, limit_val_batches=limit_batches,
                         accumulate_grad_batches=2, logger=TensorBoardLogger(output, name="training_health"),
                         callbacks=[LearningRateSpike(spike_at, spike_factor, spike_steps), *probes(every)],
                         log_every_n_steps=every, enable_progress_bar=False, accelerator="cpu")
    trainer.fit(RowTransformer(), data)
    figure = health_figure(trainer.log_dir, spike_at, spike_steps)
    figure.savefig(os.path.join(trainer.log_dir, "training_health.png"), dpi=110, bbox_inches="tight")
    for name, fig in probe_figures(trainer.log_dir, spike_at, spike_steps).items():
        fig.savefig(os.path.join(trainer.log_dir, f"{name}.png"), dpi=100, bbox_inches="tight")
    return trainer.log_dir


def health_figure(run: str, spike_at: int, spike_steps: int):
    """Six panels over the optimiser steps, the spike's steps shaded: loss and its z-score, gradient norm and its
    z-score, the update/weight ratio, the largest attention logit, the largest activation, B_simple."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = lp.read_probes(run)
    by = {name: table[table.probe == name] for name in table.probe.unique()}
    fig, axes = plt.subplots(3, 2, figsize=(11, 8.5), sharex=True)
    records = by["stability"]
    # the step records (every `every` steps) and the spike records (every flagged step): the spike itself is
    # between two logged steps, so its own records carry it into the curves
    stability = records.sort_values(["step", "kind"]).drop_duplicates("step", keep="first")
    spikes = records[records.kind == "spike"]
    total = by["gradient_dynamics"]
    total = total[total.layer == "__total__"].sort_values("step")
    attention = by["attention"].groupby("step").max_logit.max()
    outliers = by["activation_outliers"].groupby("step").max_abs.max()
    noise = by["gradient_noise_scale"].sort_values("step")
    panels = [
        (axes[0, 0], stability.step, stability.loss, "training loss"),
        (axes[0, 1], stability.step, stability.loss_z, "loss z-score"),
        (axes[1, 0], stability.step, stability.grad_norm_z, "gradient-norm z-score"),
        (axes[1, 1], total.step, total.update_ratio, "update / weight ratio (all tensors)"),
        (axes[2, 0], attention.index, attention.values, "largest attention logit (any layer)"),
        (axes[2, 1], noise.step, noise.b_simple_ema, "B_simple (EMA)"),
    ]
    for ax, x, y, title in panels:
        ax.plot(x, y, lw=1)
        ax.axvspan(spike_at, spike_at + spike_steps, color="tab:red", alpha=0.25)
        ax.set_title(title, fontsize=10)
    for ax, column in ((axes[0, 0], "loss"), (axes[0, 1], "loss_z"), (axes[1, 0], "grad_norm_z")):
        ax.scatter(spikes.step, spikes[column], s=14, color="tab:red", zorder=3, label="flagged step (spike record)")
    for ax in (axes[0, 1], axes[1, 0]):
        ax.axhline(THRESHOLD, color="0.4", ls="--", lw=0.8, label=f"threshold ({THRESHOLD:g} std)")
        ax.set_yscale("symlog", linthresh=10)
    axes[0, 1].legend(fontsize=8, loc="upper left")
    ax2 = axes[2, 0].twinx()
    ax2.plot(outliers.index, outliers.values, color="tab:orange", lw=1)
    ax2.set_ylabel("largest |activation|", color="tab:orange", fontsize=9)
    for ax in axes[2]:
        ax.set_xlabel("optimiser step")
    fig.suptitle(f"A learning-rate spike at steps {spike_at}-{spike_at + spike_steps - 1} (shaded)", fontsize=11)
    fig.tight_layout()
    return fig


def probe_figures(run: str, spike_at: int, spike_steps: int) -> dict:
    """One figure per probe page, per layer over the optimiser steps, the spike shaded: ``attention`` (maximum
    logit, mean entropy, first-token mass), ``activation_outliers`` (max |x| of the block outputs, the channel ratio)
    and ``stability`` (the z-scores against the threshold, the spike score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = lp.read_probes(run)
    figures = {}

    def shade(axes) -> None:
        for ax in axes:
            ax.axvspan(spike_at, spike_at + spike_steps, color="tab:red", alpha=0.25)

    attention = table[table.probe == "attention"].sort_values("step")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharex=True)
    for layer, rows in attention.groupby("layer", sort=False):
        label = layer.replace("blocks.layers.", "block ").replace(".self_attn", "")
        for ax, field in zip(axes, ("max_logit", "entropy_mean", "sink_mass")):
            ax.plot(rows.step, rows[field], lw=1, label=label)
    titles = ("maximum pre-softmax logit", "mean attention entropy (nats)", "mass on the first token")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser step")
    axes[0].legend(fontsize=8)
    shade(axes)
    fig.tight_layout()
    figures["attention"] = fig

    outliers = table[table.probe == "activation_outliers"].sort_values("step")
    blocks = outliers[outliers.layer.str.fullmatch(r"blocks\.layers\.\d+")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharex=True)
    for layer, rows in blocks.groupby("layer", sort=False):
        label = layer.replace("blocks.layers.", "block ")
        axes[0].plot(rows.step, rows.max_abs, lw=1, label=label)
        axes[1].plot(rows.step, rows.channel_max_ratio, lw=1, label=label)
    axes[0].set_title("max |x| of the block outputs (residual stream)", fontsize=10)
    axes[1].set_title("largest channel max / median channel max", fontsize=10)
    for ax in axes:
        ax.set_xlabel("optimiser step")
    axes[0].legend(fontsize=8)
    shade(axes)
    fig.tight_layout()
    figures["activation_outliers"] = fig

    records = table[table.probe == "stability"]
    steps = records.sort_values(["step", "kind"]).drop_duplicates("step", keep="first")
    spikes = records[records.kind == "spike"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharex=True)
    for ax, column, title in ((axes[0], "loss_z", "loss z-score"), (axes[1], "grad_norm_z", "gradient-norm z-score")):
        ax.plot(steps.step, steps[column], lw=1)
        ax.scatter(spikes.step, spikes[column], s=14, color="tab:red", zorder=3, label="spike record")
        ax.axhline(THRESHOLD, color="0.4", ls="--", lw=0.8, label=f"threshold ({THRESHOLD:g} std)")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8, loc="upper left")
    quiet = steps[steps.kind == "step"]
    axes[2].plot(quiet.step, quiet.spike_score_total, lw=1)
    axes[2].set_title("spike score (share of flagged steps so far)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("optimiser step")
    shade(axes)
    fig.tight_layout()
    figures["stability"] = fig
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="../shared/data", help="Holds MNIST/raw/ (the four IDX files).")
    parser.add_argument("--output", default="runs/examples")
    parser.add_argument("--max_epochs", type=int, default=1)
    parser.add_argument("--limit_batches", type=float, default=1.0, help="Share (or number) of batches per epoch.")
    parser.add_argument("--every", type=int, default=10, help="every_n_steps of the probes")
    parser.add_argument("--spike_at", type=int, default=300)
    parser.add_argument("--spike_factor", type=float, default=30.0)
    parser.add_argument("--spike_steps", type=int, default=3)
    parser.add_argument("--train_size", type=int, default=None, help="A seeded subset of the training split.")
    args = parser.parse_args()
    limit = args.limit_batches if args.limit_batches <= 1 else int(args.limit_batches)
    run_dir = main(args.data_dir, args.output, args.max_epochs, limit, args.every, args.spike_at, args.spike_factor,
                   args.spike_steps, args.train_size)
    print(f"records, training_health.png and the probe pages' figures in {run_dir}")
