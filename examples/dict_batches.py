"""A Hugging Face-style model: dict batches in, a dict with ``loss`` and ``logits`` out.

Batches are ``{"pixel_values": ..., "labels": ...}`` and ``forward(pixel_values, labels=None)`` returns
``{"loss": ..., "logits": ...}``, as ``transformers`` models do. The probes need three things said:
``input_key`` (the tensor to run the model on and to perturb), ``target_key`` (the labels, for class-balanced
probe sets), and for ``NoiseRobustnessMonitor`` a ``logits_fn`` that takes the logits out of the output dict.
``validation_step`` returns ``logits`` and ``target`` for ``ConfidenceMonitor``. Run
``python examples/dict_batches.py``.
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_probes import (
    ActivationStatsMonitor,
    ConfidenceMonitor,
    GradientStatsMonitor,
    LayerCorrelationMonitor,
    NoiseRobustnessMonitor,
)
from lightning_probes.datamodules import DigitsDataModule


class DictDigits(Dataset):
    """The bundled digits as dict samples ``{"pixel_values": (1, 28, 28), "labels": int}``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self.dataset[index]
        return {"pixel_values": image, "labels": torch.as_tensor(label)}


class DictClassifier(pl.LightningModule):
    """``forward(pixel_values, labels=None) -> {"loss", "logits"}``, like a ``transformers`` model."""

    def __init__(self, hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.lr = lr

    def forward(self, pixel_values: torch.Tensor, labels=None) -> dict[str, torch.Tensor]:
        logits = self.net(pixel_values)  # (batch, classes)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out

    def training_step(self, batch, batch_idx):
        out = self(**batch)
        self.log("train/loss", out["loss"])
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        out = self(**batch)
        self.log("val/loss", out["loss"])
        return {"loss": out["loss"], "logits": out["logits"], "target": batch["labels"]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main(output: str = "runs/examples", max_epochs: int = 3, limit_batches: float = 1.0) -> str:
    """Train the dict-batch model with five probes; return the run directory."""
    pl.seed_everything(0)
    digits = DigitsDataModule(batch_size=64)
    digits.setup("fit")
    train = DataLoader(DictDigits(digits.train_dataloader().dataset), batch_size=64, shuffle=True)
    val = DataLoader(DictDigits(digits.val_dataloader().dataset), batch_size=64)
    keys = {"input_key": "pixel_values", "target_key": "labels"}
    probes = [GradientStatsMonitor(every_n_steps=5), ConfidenceMonitor(),
              LayerCorrelationMonitor(num_samples=128, **keys), ActivationStatsMonitor(num_samples=128, **keys),
              NoiseRobustnessMonitor(num_samples=50, num_draws=5, logits_fn=lambda module, x: module(x)["logits"],
                                     **keys)]
    trainer = pl.Trainer(max_epochs=max_epochs, limit_train_batches=limit_batches, limit_val_batches=limit_batches,
                         default_root_dir=output, logger=pl.loggers.CSVLogger(output, "dict_batches"),
                         callbacks=probes, enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(DictClassifier(), train, val)
    return trainer.log_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/examples")
    parser.add_argument("--max_epochs", type=int, default=3)
    parser.add_argument("--limit_batches", type=float, default=1.0)
    args = parser.parse_args()
    limit = args.limit_batches if args.limit_batches <= 1 else int(args.limit_batches)
    print(main(args.output, args.max_epochs, limit))
