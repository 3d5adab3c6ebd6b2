"""`ZooDataModule`: the meta-networks' data set (``lightning-probes zoo-dataset``), split by model, by pair, or by
model and image."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any, Literal, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from lightning_probes.io import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["BASELINE_ARRAYS", "SPLITS", "ZooDataModule", "aligned_input", "split_models", "split_models_and_images"]

Task = Literal["classification", "regression"]
_TASKS = ("classification", "regression")
Split = Literal["model", "pair", "sample", "model_and_image"]
#: Optional arrays of a data set that `MetaNet`'s baselines read (``linear_stability``, ``self_calibrated``).
BASELINE_ARRAYS = ("boundary_distance", "noise_profile")
#: The protocols of `ZooDataModule`'s ``split_by`` ("sample" is the former name of "pair").
SPLITS = ("model", "pair", "sample", "model_and_image")


def split_models(model_ids: Sequence[int], split_seed: int, val_fraction: float,
                 test_fraction: float) -> dict[str, list[int]]:
    """A seeded split of model ids into ``train``, ``val`` and ``test`` (each sorted; no id in two splits).

    ``round(n * test_fraction)`` models (at least 1) go to ``test``, ``round(n * val_fraction)`` (at least 1) to
    ``val``, the rest to ``train``, in the order of ``torch.randperm`` seeded by ``split_seed``.

    Raises:
        ValueError: If fewer than 3 models leave a split empty.

    Example:
        >>> split = split_models(range(10), split_seed=0, val_fraction=0.2, test_fraction=0.2)
        >>> [len(split[k]) for k in ("train", "val", "test")]
        [6, 2, 2]
    """
    ids = sorted(int(i) for i in model_ids)
    n = len(ids)
    n_test = max(1, int(round(n * test_fraction)))
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_test - n_val < 1:
        raise ValueError(f"Expected at least 3 models to split into train, val and test, but the data set has {n} "
                         f"(val_fraction {val_fraction}, test_fraction {test_fraction})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).tolist()
    shuffled = [ids[i] for i in order]
    return {"train": sorted(shuffled[n_test + n_val:]), "val": sorted(shuffled[n_test:n_test + n_val]),
            "test": sorted(shuffled[:n_test])}


def split_models_and_images(model_ids: np.ndarray, image_ids: np.ndarray, split_seed: int, val_fraction: float,
                            test_fraction: float, groups: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Row masks of the honest protocol: test models never seen in training, test images never seen by any
    training pair.

    The groups (training runs; each model its own group when ``groups`` is ``None``) are split by `split_models`,
    so every checkpoint of one run lands on one side; the distinct images are split the same way with the seed
    ``split_seed + 1``. A row is in ``train`` when its model and its image are both train ones, likewise ``val`` and
    ``test``; the rows that mix sides are in no split (the price of the protocol: with fractions ``v`` and ``t``
    about ``(1 - v - t)^2 + v^2 + t^2`` of the rows are kept).

    Args:
        model_ids: ``(N,)`` model id of each row.
        image_ids: ``(N,)`` image id of each row (``sample_index`` into the shared image set).
        split_seed: Seed of the split.
        val_fraction: Share of the groups and of the images for validation.
        test_fraction: Share of the groups and of the images for testing.
        groups: ``(N,)`` group (training run) of each row, or ``None``.

    Returns:
        ``{"train", "val", "test"}`` -> ``(N,)`` boolean masks, disjoint.

    Example:
        >>> m = np.repeat(np.arange(10), 10); i = np.tile(np.arange(10), 10)
        >>> masks = split_models_and_images(m, i, 0, 0.2, 0.2)
        >>> [int(masks[k].sum()) for k in ("train", "val", "test")]  # 6 models x 6 images, 2 x 2, 2 x 2
        [36, 4, 4]
    """
    model_ids, image_ids = np.asarray(model_ids), np.asarray(image_ids)
    groups = model_ids if groups is None else np.asarray(groups)
    by_group = split_models(np.unique(groups).tolist(), split_seed, val_fraction, test_fraction)
    by_image = split_models(np.unique(image_ids).tolist(), split_seed + 1, val_fraction, test_fraction)
    return {k: np.isin(groups, by_group[k]) & np.isin(image_ids, by_image[k]) for k in ("train", "val", "test")}


def aligned_input(name: str, values: np.ndarray) -> torch.Tensor:
    """A class-aligned input array as a meta-network reads it: ``boundary_distance`` as ``log`` of the distance
    clipped to ``[1e-4, 1e4]`` (``+inf`` at the prediction becomes ``log 1e4``), ``probe_<layer>``
    log-probabilities clamped at -30 (a class the probe never saw is ``-inf``), anything else as float32."""
    x = torch.as_tensor(np.asarray(values), dtype=torch.float64).reshape(len(values), -1)
    if name == "boundary_distance":
        x = x.nan_to_num(posinf=1e4).clamp(1e-4, 1e4).log()
    elif name.startswith("probe_") and name not in ("probe_margin", "probe_agree"):
        x = x.clamp_min(-30.0)
    return x.float()


class _ZooDataset(Dataset):
    """Rows of the zoo data set: ``{"layers": [tensor per layer], "aligned": [tensor per aligned input], "target",
    "correct", "ratio"}``."""

    def __init__(self, layers: Sequence[torch.Tensor], target: torch.Tensor, correct: torch.Tensor,
                 ratio: torch.Tensor, aligned: Sequence[torch.Tensor] = ()) -> None:
        self.layers, self.target, self.correct, self.ratio = list(layers), target, correct, ratio
        self.aligned = list(aligned)

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"layers": [x[index] for x in self.layers], "aligned": [x[index] for x in self.aligned],
                "target": self.target[index], "correct": self.correct[index], "ratio": self.ratio[index]}


class ZooDataModule(pl.LightningDataModule):
    """The zoo data set of ``lightning-probes zoo-dataset``, split by ``model_id``: no model in two splits.

    The split is written to ``<data_dir>/splits_<split_seed>.json`` (``{"train": [ids], "val": [ids], "test":
    [ids]}``) by global rank 0, atomically. Each batch is a dict: ``layers`` (one ``(B, units)`` float tensor per
    layer, in ``layers`` order), ``target`` (``correct`` as float for ``classification``, ``ratio`` for
    ``regression``), ``correct`` (int64 0/1) and ``ratio``.

    Args:
        data_dir: The data set directory (``shard_<k>.npz``).
        task: ``"classification"`` (is the prediction correct?) or ``"regression"`` (its noise-stability ratio).
        split_seed: Seed of the split.
        val_fraction: Share of the models for validation, in (0, 1).
        test_fraction: Share of the models for testing, in (0, 1).
        batch_size: Samples per batch.
        layers: The layers the meta-network reads, in order (their arrays in the shards).
        split_by: The protocol. ``"model"``: test models are never seen in training (their images may be);
            ``"model_and_image"`` (the honest protocol): test models never seen in training and test images never
            seen by any training pair, with every checkpoint of one training run on one side when the data set has
            a ``group`` array (`split_models_and_images`); ``"pair"`` (the original study's): model-image pairs
            split at random, so every model is on both sides (``"sample"`` is its former name). With ``"pair"``
            the fractions are shares of the pairs; with ``"model_and_image"`` of the runs and of the images. The
            split file is written for ``"model"`` and ``"model_and_image"``.
        max_models: Use only the first ``max_models`` model ids (to measure how results grow with the zoo);
            ``None`` uses all.
        aligned: Class-aligned input arrays of the data set (``zoo-dataset --features``: ``boundary_distance``,
            ``probe_<layer>``, ``probe_margin``, ``context``), read as they are (`aligned_input`) and given to the
            meta-network beside the layers (batch key ``aligned``; `MetaNet`'s ``aligned_dims``).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        data_dir: str = "runs/zoo_dataset",
        task: Task = "classification",
        split_seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        batch_size: int = 256,
        layers: Sequence[str] = ("pool2", "fc1", "fc2", "fc3"),
        split_by: Split = "model",
        max_models: Optional[int] = None,
        num_workers: int = 0,
        aligned: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if task not in _TASKS:
            raise ValueError(f"Expected `task` to be one of {_TASKS}, but got {task!r}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < value < 1:
                raise ValueError(f"Expected `{name}` to be in (0, 1), but got {value!r}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"Expected `val_fraction + test_fraction` below 1, but got {val_fraction + test_fraction}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive integer, but got {batch_size!r}")
        if split_by not in SPLITS:
            raise ValueError(f"Expected `split_by` to be one of {SPLITS}, but got {split_by!r}")
        if max_models is not None and (isinstance(max_models, bool) or not isinstance(max_models, int)
                                       or max_models < 3):
            raise ValueError(f"Expected `max_models` to be None or an integer >= 3, but got {max_models!r}")
        if isinstance(layers, str) or not layers:
            raise ValueError(f"Expected `layers` to be a list of layer names such as ['pool2', 'fc3'], but got "
                             f"{layers!r}")
        if isinstance(aligned, str):
            raise ValueError(f"Expected `aligned` to be a list of array names such as ['boundary_distance'], but got "
                             f"{aligned!r}")
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.splits: Optional[dict[str, list[int]]] = None
        self.arrays: dict[str, dict[str, np.ndarray]] = {}
        self._sets: dict[str, _ZooDataset] = {}

    @property
    def split_path(self) -> str:
        """``<data_dir>/splits_<split_seed>.json``."""
        return os.path.join(self.data_dir, f"splits_{self.hparams.split_seed}.json")

    @property
    def layer_dims(self) -> list[int]:
        """Units of each layer, after ``setup``."""
        return [int(self.arrays["train"][name].shape[1]) for name in self.hparams.layers]

    @property
    def aligned_dims(self) -> list[int]:
        """Width of each aligned input, after ``setup``."""
        return [int(np.prod(self.arrays["train"][name].shape[1:])) for name in self.hparams.aligned]

    @property
    def settings(self) -> dict[str, Any]:
        """The data set's settings from its ``dataset.json`` (``sigma``, ``num_draws``, ...); empty without one."""
        path = os.path.join(self.data_dir, "dataset.json")
        try:
            with open(path, encoding="utf-8") as handle:
                return dict(json.load(handle).get("settings", {}))
        except (OSError, ValueError):
            return {}

    def setup(self, stage: Optional[str] = None) -> None:
        from lightning_probes.studies.zoo import load_shards

        if self.arrays:
            return
        hp = self.hparams
        # A `group` array (the training run of each row), where the data set has one, keeps a run's checkpoints on
        # one side of the "model_and_image" split; the baselines' arrays are read where the data set has them,
        # whatever the inputs, so every run reports the same baselines.
        data = load_shards(self.data_dir, layers=[*hp.layers, *hp.aligned, "group", *BASELINE_ARRAYS])
        missing = [n for n in [*hp.layers, *hp.aligned] if n not in data]
        if missing:
            found = sorted(k for k in data if k not in ("model_id", "sample_index", "label", "pred", "correct",
                                                        "ratio", "group"))
            raise ValueError(f"Expected `layers` and `aligned` to name arrays of the data set, but {missing} are not "
                             f"in {self.data_dir!r} (it has {found})")
        model_ids = np.unique(data["model_id"])
        if hp.max_models is not None:
            model_ids = model_ids[: hp.max_models]
            keep = np.isin(data["model_id"], model_ids)
            data = {k: v[keep] for k, v in data.items()}
        if hp.split_by == "model":
            self.splits = split_models(model_ids.tolist(), hp.split_seed, hp.val_fraction, hp.test_fraction)
            self._write_split()
            masks = {k: np.isin(data["model_id"], ids) for k, ids in self.splits.items()}
        elif hp.split_by == "model_and_image":
            masks = split_models_and_images(data["model_id"], data["sample_index"], hp.split_seed, hp.val_fraction,
                                            hp.test_fraction, data.get("group"))
            self.splits = {k: sorted(np.unique(data["model_id"][m]).tolist()) for k, m in masks.items()}
            self._write_split()
        else:  # "pair" (or its former name "sample")
            rows = split_models(range(len(data["model_id"])), hp.split_seed, hp.val_fraction, hp.test_fraction)
            masks = {}
            for k, idx in rows.items():
                mask = np.zeros(len(data["model_id"]), dtype=bool)
                mask[idx] = True
                masks[k] = mask
            self.splits = {k: sorted(np.unique(data["model_id"][m]).tolist()) for k, m in masks.items()}
        for split, mask in masks.items():
            self.arrays[split] = {k: v[mask] for k, v in data.items()}
            a = self.arrays[split]
            correct = torch.as_tensor(a["correct"], dtype=torch.int64)
            ratio = torch.as_tensor(a["ratio"], dtype=torch.float32)
            target = correct.float() if hp.task == "classification" else ratio
            layers = [torch.as_tensor(a[name], dtype=torch.float32) for name in hp.layers]
            aligned = [aligned_input(name, a[name]) for name in hp.aligned]
            self._sets[split] = _ZooDataset(layers, target, correct, ratio, aligned)

    @rank_zero_only
    def _write_split(self) -> None:
        assert self.splits is not None
        if os.path.isfile(self.split_path):
            with open(self.split_path, encoding="utf-8") as handle:
                try:
                    if json.load(handle) == self.splits:
                        return
                except ValueError:
                    pass
            log.info("%s is rewritten: the data set's models changed", self.split_path)
        atomic_write_json(self.split_path, self.splits)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self._sets:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        workers = self.hparams.num_workers
        return DataLoader(self._sets[split], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
