"""A model with two inputs: tell the probes how to run it with ``forward_fn(pl_module, batch)``.

The network sees an image and a side vector (``forward(image, side)``), so ``pl_module(batch[0])`` (what the
probes call by default) cannot run it. ``forward_fn`` runs the model on one batch for the representation probes
and ``NoiseRobustnessMonitor`` (which adds its noise to the batch's first element, the image, and passes the
other entries as they are). Run ``python examples/two_inputs.py``.
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_probes import ActivationStatsMonitor, ConfidenceMonitor, LayerCorrelationMonitor, NoiseRobustnessMonitor


class TwoInputNet(pl.LightningModule):
    """An image branch and a side-vector branch, concatenated, then a classifier."""

    def __init__(self, side_features: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.side = nn.Sequential(nn.Linear(side_features, 8), nn.ReLU())
        self.head = nn.Linear(40, num_classes)

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.image(image), self.side(side)], dim=1))  # (batch, classes)

    def training_step(self, batch, batch_idx):
        image, side, target = batch
        loss = nn.functional.cross_entropy(self(image, side), target)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        image, side, target = batch
        logits = self(image, side)
        loss = nn.functional.cross_entropy(logits, target)
        self.log("val/loss", loss)
        return {"loss": loss, "logits": logits, "target": target}  # the contract ConfidenceMonitor reads

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loaders(n: int = 512, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    image, side = torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 4, generator=g)
    target = (image.flatten(1)[:, :5].sum(1) + side[:, 0] > 0).long() + 2 * (side[:, 1] > 0).long()
    data = TensorDataset(image, side, target)
    train, val = torch.utils.data.random_split(data, [n - 128, 128], generator=g)
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=batch_size)


def main(output: str = "runs/examples", max_epochs: int = 3) -> str:
    """Train the two-input model with four probes; return the run directory."""
    pl.seed_everything(0)

    def forward_fn(module, batch):
        return module(batch[0], batch[1])

    probes = [ConfidenceMonitor(),
              LayerCorrelationMonitor(num_samples=64, forward_fn=forward_fn),
              ActivationStatsMonitor(num_samples=64, forward_fn=forward_fn),
              NoiseRobustnessMonitor(num_samples=32, num_draws=5, forward_fn=forward_fn)]
    trainer = pl.Trainer(max_epochs=max_epochs, default_root_dir=output, logger=pl.loggers.CSVLogger(output, "two"),
                         callbacks=probes, enable_progress_bar=False, enable_checkpointing=False)
    train, val = loaders()
    trainer.fit(TwoInputNet(), train, val)
    return trainer.log_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/examples")
    parser.add_argument("--max_epochs", type=int, default=3)
    args = parser.parse_args()
    print(main(args.output, args.max_epochs))
