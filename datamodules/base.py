"""`ImageDataModule`: seeded splits, normalisation and loaders shared by every data set."""

from __future__ import annotations

from typing import Literal, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lightning_probes.errors import DataFilesError, DownloadError


class TensorImageDataset(Dataset):
    """Images held in memory as a ``uint8`` tensor ``(N, C, H, W)``, normalised per item.

    Args:
        images: ``uint8`` tensor of shape ``(N, C, H, W)``.
        targets: ``int64`` tensor of shape ``(N,)``.
        mean: Per-channel mean, in [0, 1] pixel units.
        std: Per-channel standard deviation, in [0, 1] pixel units.
        augment: Optional torchvision v2 transform applied to the ``uint8`` image before normalising.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: Optional[v2.Transform] = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"Expected `images` to be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"Expected as many targets as images, got {len(targets)} and {len(images)}")
        self.images = images
        self.targets = targets.long()
        self.augment = augment
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """Map a ``uint8`` image ``(C, H, W)`` (or a batch) to normalised ``float32``."""
        return (image.float() / 255.0 - self._mean) / self._std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        return self.normalize(image), self.targets[index]


class ImageDataModule(pl.LightningDataModule):
    """Base DataModule: the official training set split (seeded) into train and validation, plus a test set.

    Subclasses implement ``_load(train)`` returning ``uint8`` images ``(N, C, H, W)`` and labels, and set
    ``mean``, ``std`` and ``default_augmentation``.

    Args:
        data_dir: Directory holding (or receiving) the data files.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (0 loads in the main process).
        val_fraction: Share of the official training set held out for validation, in (0, 1).
        seed: Seed of the train/validation split and of the ``train_half`` split.
        augment: Apply the data set's default augmentation to training images.
        train_half: ``None`` trains on the whole training split; ``0`` or ``1`` re-splits it into two seeded
            halves and trains on that half.
        swap_train_val: Train on the validation split and validate on the training split.
        download: Download missing files in ``prepare_data`` (needs a network).
        train_size: ``None`` trains on the whole training split; a positive integer trains on a seeded subset of
            that many of its samples (after ``train_half``), e.g. to train many weak-to-strong models fast.
    """

    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    num_classes: int = 10

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 42,
        augment: bool = False,
        train_half: Optional[Literal[0, 1]] = None,
        swap_train_val: bool = False,
        download: bool = False,
        train_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive integer, but got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"Expected `num_workers` to be a non-negative integer, but got {num_workers!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"Expected `val_fraction` to be in (0, 1), but got {val_fraction!r}")
        if train_half not in (None, 0, 1):
            raise ValueError(f"Expected `train_half` to be None, 0 or 1, but got {train_half!r}")
        if train_size is not None and (isinstance(train_size, bool) or not isinstance(train_size, int)
                                       or train_size < 1):
            raise ValueError(f"Expected `train_size` to be None or a positive integer, but got {train_size!r}")
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.train_set: Optional[TensorImageDataset] = None
        self.val_set: Optional[TensorImageDataset] = None
        self.test_set: Optional[TensorImageDataset] = None

    # -- to implement -------------------------------------------------------------------------------
    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(images uint8 (N, C, H, W), labels int64 (N,))`` of the official train or test set."""
        raise NotImplementedError

    def _download(self) -> None:
        """Fetch the files into ``data_dir``; subclasses with a download source override this."""

    def default_augmentation(self) -> v2.Transform:
        """The torchvision v2 transform applied to ``uint8`` training images when ``augment=True``."""
        return v2.Identity()

    # -- Lightning hooks ----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.hparams.download:
            self._download()

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = self._load(train=True)
            generator = torch.Generator().manual_seed(self.hparams.seed)
            order = torch.randperm(len(images), generator=generator)
            n_val = max(1, int(round(len(images) * self.hparams.val_fraction)))
            val_idx, train_idx = order[:n_val], order[n_val:]
            if self.hparams.swap_train_val:
                train_idx, val_idx = val_idx, train_idx
            if self.hparams.train_half is not None:
                halves = torch.randperm(len(train_idx), generator=generator)
                half = len(train_idx) // 2
                chosen = halves[:half] if self.hparams.train_half == 0 else halves[half:]
                train_idx = train_idx[chosen]
            if self.hparams.train_size is not None:
                if self.hparams.train_size > len(train_idx):
                    raise ValueError(f"Expected `train_size` to be at most the {len(train_idx)} samples of the "
                                     f"training split, but got {self.hparams.train_size}")
                subset = torch.randperm(len(train_idx), generator=generator)[: self.hparams.train_size]
                train_idx = train_idx[subset.sort().values]
            augment = self.default_augmentation() if self.hparams.augment else None
            self.train_set = TensorImageDataset(images[train_idx], labels[train_idx], self.mean, self.std, augment)
            self.val_set = TensorImageDataset(images[val_idx], labels[val_idx], self.mean, self.std)
        if stage in (None, "test", "predict") and self.test_set is None:
            images, labels = self._load(train=False)
            self.test_set = TensorImageDataset(images, labels, self.mean, self.std)

    def _loader(self, dataset: Optional[Dataset], shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, num_workers=workers,
                          persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def missing_files_error(name: str, directory: str, expected: list[str], hint: str) -> DataFilesError:
    """One clear error naming the directory searched and the files expected there."""
    files = ", ".join(expected)
    return DataFilesError(f"{name} data not found: searched {directory!r} for {files}. {hint}")


def download_failed_error(name: str, directory: str, err: Exception) -> DownloadError:
    """A download that could not reach its server, said plainly."""
    return DownloadError(
        f"Could not download {name} into {directory!r} ({type(err).__name__}: {err}). "
        "Without a network, copy the files there by hand and set `download: false`."
    )
