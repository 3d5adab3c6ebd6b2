"""CIFAR-10 from a local ``.npz`` copy or torchvision's pickled batches."""

from __future__ import annotations

import os

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.transforms import v2

from lightning_probes.datamodules.base import ImageDataModule, download_failed_error, missing_files_error

_NPZ = {True: "cifar10_train.npz", False: "cifar10_test.npz"}


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (50,000 training and 10,000 test images, 3x32x32).

    Looked for, in order: ``<data_dir>/cifar10/cifar10_{train,test}.npz``, ``<data_dir>/cifar10_{train,test}.npz``
    (arrays ``x``: N x 32 x 32 x 3 uint8 RGB and ``y``: N labels), then torchvision's
    ``<data_dir>/cifar-10-batches-py``.

    Args:
        data_dir: Directory holding one of the layouts above.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        val_fraction: Share of the training set held out for validation, in (0, 1).
        seed: Seed of the train/validation split and of the ``train_half`` split.
        augment: Random crop (padding 4) and horizontal flip on training images.
        train_half: ``None``, ``0`` or ``1``: train on one seeded half of the training split.
        swap_train_val: Train on the validation split and validate on the training split.
        download: Download torchvision's archive in ``prepare_data`` (needs a network).
        train_size: ``None`` (the whole training split) or the size of a seeded subset of it.
    """

    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def _npz_path(self, train: bool) -> str | None:
        for folder in (os.path.join(self.data_dir, "cifar10"), self.data_dir):
            path = os.path.join(folder, _NPZ[train])
            if os.path.isfile(path):
                return path
        return None

    def _download(self) -> None:
        if self._npz_path(True) and self._npz_path(False):
            return
        try:
            for train in (True, False):
                CIFAR10(self.data_dir, train=train, download=True)
        except Exception as err:
            raise download_failed_error("CIFAR-10", self.data_dir, err) from err

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        path = self._npz_path(train)
        if path is not None:
            with np.load(path) as archive:
                for key in ("x", "y"):
                    if key not in archive:
                        raise KeyError(
                            f"{path!r} has no array {key!r}; expected arrays 'x' (N, 32, 32, 3) and 'y' (N,)")
                x, y = archive["x"], archive["y"]
        elif os.path.isdir(os.path.join(self.data_dir, "cifar-10-batches-py")):
            dataset = CIFAR10(self.data_dir, train=train, download=False)
            x, y = dataset.data, np.asarray(dataset.targets)
        else:
            raise missing_files_error(
                "CIFAR-10", self.data_dir,
                [f"cifar10/{_NPZ[train]}", _NPZ[train], "cifar-10-batches-py/"],
                "Pass `download=True` with a network, or point `data_dir` at a copy.")
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
            raise ValueError(f"Expected CIFAR-10 images as uint8 (N, 32, 32, 3), got {x.dtype} {x.shape}")
        images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        return images, torch.from_numpy(np.asarray(y, dtype=np.int64))

    def default_augmentation(self) -> v2.Transform:
        return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
