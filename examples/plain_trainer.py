"""Attach every probe to a plain ``pytorch_lightning.Trainer`` (no CLI, no config file).

The MLP learns scikit-learn's bundled digits (no download); the probes write ``<run>/probes/*.jsonl`` and
TensorBoard gets their scalars and heatmaps. Run ``python examples/plain_trainer.py`` (about a minute on 2 CPU
cores), then ``tensorboard --logdir runs/examples``.
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_probes import (
    ActivationStatsMonitor,
    AlignmentMonitor,
    AugmentationInvarianceMonitor,
    ConfidenceMonitor,
    GradientDynamicsMonitor,
    GradientStatsMonitor,
    LayerCorrelationMonitor,
    NoiseRobustnessMonitor,
    read_probes,
)
from lightning_probes.datamodules import DigitsDataModule
from lightning_probes.models import MLP


def main(output: str = "runs/examples", max_epochs: int = 5, limit_batches: float = 1.0) -> str:
    """Train the MLP with every probe; return the run directory."""
    pl.seed_everything(42)
    probes = [
        GradientStatsMonitor(every_n_steps=5),
        GradientDynamicsMonitor(every_n_steps=5),
        ConfidenceMonitor(),
        NoiseRobustnessMonitor(num_samples=100, num_draws=10, sigma=0.5),
        LayerCorrelationMonitor(num_samples=256),
        ActivationStatsMonitor(num_samples=256),
        AugmentationInvarianceMonitor(num_images=4, num_views=10),
        AlignmentMonitor(num_samples=256),
    ]
    trainer = pl.Trainer(max_epochs=max_epochs, limit_train_batches=limit_batches, limit_val_batches=limit_batches,
                         logger=TensorBoardLogger(output, name="plain_trainer"), callbacks=probes,
                         log_every_n_steps=5, enable_progress_bar=False)
    trainer.fit(MLP(lr=0.05), DigitsDataModule(batch_size=64))
    table = read_probes(trainer.log_dir)
    print(table.groupby("probe").size().to_string())  # records per probe
    return trainer.log_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/examples")
    parser.add_argument("--max_epochs", type=int, default=5)
    parser.add_argument("--limit_batches", type=float, default=1.0, help="Share (or number) of batches per epoch.")
    args = parser.parse_args()
    main(args.output, args.max_epochs, args.limit_batches if args.limit_batches <= 1 else int(args.limit_batches))
