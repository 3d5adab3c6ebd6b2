"""The data behind the data-dependent analyses: one seeded set of test samples, and one pass of each model over
it that keeps the logits, the penultimate-layer features and the per-layer activation statistics."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_probes.capture import BOUNDED, ActivationCapture, reduce_features, select_modules, uncompiled
from lightning_probes.functional import ActivationAccumulator, MomentAccumulator, effective_rank_from_covariance
from lightning_probes.probe_data import batch_inputs, batch_labels

log = logging.getLogger(__name__)

__all__ = ["ModelPass", "Samples", "last_linear", "load_samples", "run_model"]

#: Features per layer kept for the effective rank (as `ActivationStatsMonitor` by default).
MAX_FEATURES = 512


@dataclass
class Samples:
    """The analysed samples: ``inputs`` and ``labels`` tensors, and which test indices they are."""

    inputs: torch.Tensor
    labels: torch.Tensor
    indices: list[int]

    def batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.labels), size):
            yield self.inputs[start:start + size], self.labels[start:start + size]


def load_samples(datamodule: Any, num_samples: int, seed: int) -> Samples:
    """At most ``num_samples`` samples of the DataModule's test set, chosen uniformly without replacement by
    ``seed`` (the same samples for every model), in test-set order.

    Raises:
        ValueError: When the test set is empty or its batches hold no labels.
    """
    datamodule.prepare_data()
    datamodule.setup("test")
    inputs, labels = [], []
    for batch in datamodule.test_dataloader():
        x, y = batch_inputs(batch), batch_labels(batch)
        if y is None:
            raise ValueError(f"Expected the test batches of {type(datamodule).__name__} to hold class labels, but "
                             "found none")
        inputs.append(x)
        labels.append(y)
    if not inputs:
        raise ValueError(f"Expected the test set of {type(datamodule).__name__} to hold data, but it is empty")
    x, y = torch.cat(inputs), torch.cat(labels)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(y), generator=generator)[:num_samples].sort().values
    return Samples(x[chosen], y[chosen], chosen.tolist())


def last_linear(model: nn.Module) -> Optional[str]:
    """Name of the model's last ``nn.Linear`` (its classifier): its input is the penultimate-layer feature."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


@dataclass
class ModelPass:
    """One model's outputs on the samples: ``logits`` ``(N, C)``, ``penultimate`` ``(N, D)`` (or ``None``) and
    ``layers``: per analysed layer the activation statistics (``mean``, ``std``, ``sparsity``,
    ``positive_ratio``, ``dead_units``, ``dead_fraction``, ``saturation``, ``effective_rank``, ``units``)."""

    logits: torch.Tensor
    penultimate: Optional[torch.Tensor]
    layers: dict[str, dict[str, Any]]


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"Expected the model to return logits (a tensor), but it returned {type(output).__name__}")


@torch.no_grad()
def run_model(model: nn.Module, samples: Samples, batch_size: int = 256) -> ModelPass:
    """Run ``model`` (eval mode, no gradients) over the samples, keeping the logits, the input of its last
    ``Linear`` and the statistics of the signal leaving each block (the layers `ActivationStatsMonitor` analyses
    by default: `lightning_probes.capture.select_modules`)."""
    model.eval()
    stats: dict[str, ActivationAccumulator] = {}
    moments: dict[str, MomentAccumulator] = {}
    logits, penultimate = [], []
    with uncompiled(model), ExitStack() as stack:
        modules = select_modules(model)
        capture = stack.enter_context(ActivationCapture(modules, None).capturing())
        head = last_linear(model)
        head_capture = None
        if head is not None:
            head_module = dict(model.named_modules())[head]
            head_capture = stack.enter_context(ActivationCapture({head: head_module}, None, inputs=True).capturing())
        for x, _ in samples.batches(batch_size):
            logits.append(_logits(model(x)).float())
            for name, output in capture.pop(allow_missing=True).items():
                bounds = next((b for t, b in BOUNDED.items() if isinstance(modules[name], t)), None)
                stats.setdefault(name, ActivationAccumulator(bounds)).update(output)
                flat = reduce_features(output, MAX_FEATURES).double()
                moments.setdefault(name, MomentAccumulator(flat.shape[1])).update(flat)
            if head_capture is not None:
                penultimate.append(head_capture.pop()[head].flatten(1).double())
    layers = {}
    for name, accumulator in stats.items():
        values = accumulator.compute()
        values["effective_rank"] = float(effective_rank_from_covariance(moments[name].covariance()))
        values["units"] = int(len(accumulator.alive)) if accumulator.alive is not None else 0
        layers[name] = values
    return ModelPass(torch.cat(logits), torch.cat(penultimate) if penultimate else None, layers)
