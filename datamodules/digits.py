"""scikit-learn's bundled handwritten digits, resized to MNIST's 1x28x28: the offline default."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from lightning_probes.datamodules.base import ImageDataModule

_TEST_FRACTION = 0.2
_TEST_SEED = 0


class DigitsDataModule(ImageDataModule):
    """The 1,797 real 8x8 digits of ``sklearn.datasets.load_digits``, upsampled (bilinear) to 1x28x28.

    Needs no download and no files. A fixed 20% (seeded independently of ``seed``) is the test set; the
    rest plays the role of the official training set.

    Args:
        val_fraction: Share of the training part held out for validation, in (0, 1).
        **kwargs: Further `ImageDataModule` arguments (``data_dir`` and ``download`` are unused: the data ship
            with scikit-learn; ``augment`` adds random affine jitter).
    """

    mean = (0.3056,)  # measured on the training part
    std = (0.3247,)

    def __init__(self, val_fraction: float = 0.2, **kwargs: Any) -> None:
        super().__init__(val_fraction=val_fraction, **kwargs)

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
        images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(_TEST_SEED))
        n_test = int(round(len(images) * _TEST_FRACTION))
        idx = order[n_test:] if train else order[:n_test]
        return images[idx], labels[idx]

    def default_augmentation(self) -> v2.Transform:
        return v2.RandomAffine(degrees=10, translate=(0.1, 0.1))
