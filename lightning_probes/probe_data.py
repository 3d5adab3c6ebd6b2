"""The fixed, seeded set of validation samples that the analysis probes run on."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


def forked_rng(pl_module: pl.LightningModule):
    """A forked global random state (CPU, and the module's CUDA device): drawing probe sets, noise or
    augmentations inside it leaves training's random stream as it was."""
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


class MissingValidationDataError(ValueError):
    """The Trainer has no validation data to draw a probe set from."""


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` from a batch given as a tuple/list or a dict (first two values)."""
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch) if isinstance(batch, (list, tuple)) \
        else None
    if values is None or len(values) < 2:
        raise TypeError(f"Expected a validation batch of (inputs, targets), but got {type(batch).__name__}")
    return values[0], values[1]


def select_balanced(labels: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``num_samples`` entries, spread as evenly over the classes as the data allow (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    pools = {int(c): (labels == c).nonzero().flatten() for c in labels.unique()}
    pools = {c: idx[torch.randperm(len(idx), generator=generator)] for c, idx in pools.items()}
    chosen: list[int] = []
    taken = dict.fromkeys(pools, 0)
    target = min(num_samples, len(labels))
    while len(chosen) < target:
        for c in pools:  # round robin over the classes
            if taken[c] < len(pools[c]) and len(chosen) < target:
                chosen.append(int(pools[c][taken[c]]))
                taken[c] += 1
    return torch.tensor(sorted(chosen), dtype=torch.long)


def validation_loader(trainer: pl.Trainer) -> Any:
    """The first validation dataloader, set up if the loop has not done so yet."""
    loaders = trainer.val_dataloaders
    if loaders is None:
        loop = trainer.fit_loop.epoch_loop.val_loop
        loop.setup_data()
        loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise MissingValidationDataError("it needs validation data, but the Trainer has no validation dataloader")
    return loaders


def collect_probe_set(trainer: pl.Trainer, num_samples: int, seed: int,
                      search_batches: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs, labels, indices)`` of a class-balanced, seeded subset of the first validation batches.

    ``indices`` are positions in the validation loader's order.
    """
    inputs, labels = [], []
    for i, batch in enumerate(validation_loader(trainer)):
        x, y = split_batch(batch)
        inputs.append(x.cpu())
        labels.append(y.cpu())
        if i + 1 >= search_batches:
            break
    if not inputs:
        raise ValueError("The validation dataloader yielded no batch")
    all_inputs, all_labels = torch.cat(inputs), torch.cat(labels)
    if len(all_labels) < num_samples:
        log.warning("Only %d validation samples found in %d batches; using all of them (num_samples=%d)",
                    len(all_labels), search_batches, num_samples)
    indices = select_balanced(all_labels, num_samples, seed)
    return all_inputs[indices], all_labels[indices], indices
