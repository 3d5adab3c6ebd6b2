"""MNIST through torchvision's raw (IDX) layout."""

from __future__ import annotations

import os

import torch
from torchvision.datasets import MNIST
from torchvision.transforms import v2

from lightning_probes.datamodules.base import ImageDataModule, download_failed_error, missing_files_error

_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class MNISTDataModule(ImageDataModule):
    """MNIST (60,000 training and 10,000 test digits, 1x28x28), read from ``<data_dir>/MNIST/raw``.

    Args:
        data_dir: Directory that holds ``MNIST/raw/`` with the four uncompressed IDX files.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        val_fraction: Share of the training set held out for validation, in (0, 1).
        seed: Seed of the train/validation split and of the ``train_half`` split.
        augment: Random affine jitter (rotation 10 degrees, translation 10%) on training images.
        train_half: ``None``, ``0`` or ``1``: train on one seeded half of the training split.
        swap_train_val: Train on the validation split and validate on the training split.
        download: Download the files with torchvision in ``prepare_data`` (needs a network).
        train_size: ``None`` (the whole training split) or the size of a seeded subset of it.
    """

    mean = (0.1307,)
    std = (0.3081,)

    def _raw_dir(self) -> str:
        return os.path.join(self.data_dir, "MNIST", "raw")

    def _download(self) -> None:
        try:
            for train in (True, False):
                MNIST(self.data_dir, train=train, download=True)
        except Exception as err:  # torchvision tries several mirrors and re-raises the last failure
            raise download_failed_error("MNIST", self._raw_dir(), err) from err

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self._raw_dir()
        missing = [f for f in _FILES[train] if not os.path.isfile(os.path.join(raw, f))]
        if missing:
            raise missing_files_error("MNIST", raw, list(_FILES[train]),
                                      "Pass `download=True` with a network, or point `data_dir` at a copy.")
        dataset = MNIST(self.data_dir, train=train, download=False)
        return dataset.data.unsqueeze(1).contiguous(), dataset.targets.long()

    def default_augmentation(self) -> v2.Transform:
        return v2.RandomAffine(degrees=10, translate=(0.1, 0.1))
