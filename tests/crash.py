"""A callback that stops a ``lightning fit`` subprocess at a chosen batch, so that a test can ``kill -9`` it there.

``LP_PAUSE_AT="<epoch>:<batch>"`` and ``LP_PAUSE_MARKER=<path>`` in the environment: at that training batch the
callback writes the marker file and sleeps until the test kills the process. Without them it does nothing.

`EpochSeededDigits`: the digits with a training order that depends on the epoch only, so that a run resumed at an
epoch boundary trains on the same batches as an uninterrupted one (a plain shuffle draws from the global random state,
which a resume does not restore) and its probes' values can be compared.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from datamodules import DigitsDataModule


class PauseAt(pl.Callback):
    """Write a marker and sleep at the training batch given by ``LP_PAUSE_AT`` (``epoch:batch``)."""

    def __init__(self) -> None:
        spec = os.environ.get("LP_PAUSE_AT")
        self.at = tuple(int(v) for v in spec.split(":")) if spec else None
        self.marker = os.environ.get("LP_PAUSE_MARKER")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.at == (trainer.current_epoch, batch_idx) and self.marker:
            Path(self.marker).write_text(str(os.getpid()))
            while True:  # the test sends SIGKILL
                time.sleep(1)


class EpochOrder(Sampler):
    """Epoch 0 in order, epoch 1 reversed, ...: a resumed run's first batch is not the first run's."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = list(range(self.n))
        return iter(order[::-1] if self.epoch % 2 else order)


class EpochSampler(Sampler):
    """A shuffle seeded by the epoch (Lightning calls ``set_epoch`` at every epoch start, a resumed one too)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())


class EpochSeededDigits(DigitsDataModule):
    """`DigitsDataModule` whose training batches depend on the epoch only (`EpochSampler`)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=EpochSampler(len(self.train_set)))
