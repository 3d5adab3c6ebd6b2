"""What `GradientDynamicsMonitor` keeps between the hooks of a step and between steps, and how a logged step's
combined numbers become the columns of its records."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from lightning_probes.functional.dynamics import COUNT_NAMES

#: Record keys holding integers.
INTEGER_KEYS = ("zero_count", "minima_crossings", "maxima_crossings", "sampled_entries")


@dataclass
class Previous:
    """What a step leaves for the comparison at the next (logged) step of the same optimiser.

    Attributes:
        state: ``int8`` code per tracked entry (`lightning_probes.functional._fused.state_codes`): gradient sign
            and level (below the release / zero threshold), update direction. One byte per entry: the only
            per-entry state kept between steps (a compared step rewrites it in place).
        finite: 0-d bool tensor (on the device): whether every gradient of the step was finite.
        count: The optimiser's step count of the step.
        tracked: Indices (into the probe's parameters) of the tensors the state covers, in order.
    """

    state: torch.Tensor
    finite: torch.Tensor
    count: int
    tracked: list[int]


@dataclass
class Pending:
    """A step between ``on_before_optimizer_step`` and the optimiser's post-step hook (device tensors only).

    Attributes:
        count: The optimiser's step count of this step.
        tracked: Indices of the tracked tensors that have a gradient, in order.
        log: The step is logged (a record is written).
        snapshot: The next step is logged: this step leaves a `Previous`.
        step: ``trainer.global_step`` of the step.
        epoch: ``trainer.current_epoch`` of the step.
        finite: 0-d bool tensor: every gradient finite.
        grad_norm: ``(P,)`` squared gradient norm per tracked tensor (this rank's part, unscaled).
        sizes: Number of this rank's followed entries of each tracked tensor.
        buffers: The state buffer holding the step's codes and the weights' compact before-copy
            (`lightning_probes.callbacks._dynamics_paths.Buffers`; freed after the step, the state buffer going
            on as the next `Previous` on a snapshot step).
        whole: Every entry of whole tensors is followed (the compiled kernels may run).
        counts: ``(P, 7)`` float64 transition counts in the order of ``COUNT_NAMES`` (logged steps).
        has_previous: A `Previous` of the step before existed for the same tensors (logged steps).
        previous_finite: 0-d bool tensor: the previous step's gradients were finite (logged steps).
        sample: The sign-map columns of this step's gradients (logged steps).
        update_norm: ``(P,)`` ``||w_after - w_before||**2`` over the followed entries (set after the step).
        weight_norm: ``(P,)`` ``||w_after||**2`` (set after the step).
        scale: ``1 / loss scale`` when the gradients were still scaled by an AMP GradScaler, else ``None``.
        followed_weight: ``(P,)`` ``||w_after||**2`` over the followed entries (set after a logged step; the
            denominator of ``update_ratio``).
        initial: ``(||w_after - w_0||**2, ||w_0||**2)``, ``(P,)`` each (``init_distance``; set after a logged step).
    """

    count: int
    tracked: list[int]
    log: bool
    snapshot: bool
    step: int
    epoch: int
    finite: torch.Tensor
    grad_norm: torch.Tensor
    sizes: list[int]
    buffers: Optional[Any] = None
    whole: bool = False
    counts: Optional[torch.Tensor] = None
    has_previous: bool = False
    previous_finite: Optional[torch.Tensor] = None
    sample: Optional[torch.Tensor] = None
    update_norm: Optional[torch.Tensor] = None
    weight_norm: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    followed_weight: Optional[torch.Tensor] = None
    initial: Optional[tuple[torch.Tensor, torch.Tensor]] = None


class Deferred:
    """A logged step's records, made from its block once: at the flush (``__call__`` with the block on the host)
    or earlier, when a later step needs them made first (`materialise_all`); made records are kept and returned
    again, so each step's records are made once and written once, in order.

    Args:
        produce: Makes the records from the block on the host.
        block: The step's block on its device.
    """

    def __init__(self, produce: Callable[[torch.Tensor], list[dict[str, Any]]], block: torch.Tensor) -> None:
        self.produce = produce
        self.block: Optional[torch.Tensor] = block
        self.records: Optional[list[dict[str, Any]]] = None

    def __call__(self, host: Optional[torch.Tensor] = None) -> list[dict[str, Any]]:
        if self.records is None:
            self.records = self.produce(host if host is not None else self.block.cpu())
            self.block = None
        return self.records

    @staticmethod
    def materialise_all(items: Sequence[Deferred]) -> None:
        """Make the records of every item not made yet, in order, from one host copy of their blocks."""
        todo = [d for d in items if d.records is None]
        if not todo:
            return
        flat = torch.cat([d.block.reshape(-1) for d in todo]).cpu()  # one transfer
        for item, host in zip(todo, flat.split([d.block.numel() for d in todo])):
            item(host)


def record_columns(counts: np.ndarray, sizes: Sequence[int], grad_norm: np.ndarray, update_norm: np.ndarray,
                   weight_norm: np.ndarray, comparable: bool, skipped: bool) -> dict[str, np.ndarray]:
    """The columns of a logged step's records, one entry per tracked tensor and a last one for all of them.

    Args:
        counts: ``(P * 7,)`` transition counts (``COUNT_NAMES`` per tensor), combined over the ranks.
        sizes: Per tensor, the entries the counts are over (all of them, or the ``max_entries`` subset).
        grad_norm: ``(P,)`` gradient norms.
        update_norm: ``(P,)`` update norms over the followed entries (NaN when unknown).
        weight_norm: ``(P,)`` weight norms.
        comparable: The step has a finite previous step to compare with.
        skipped: The AMP GradScaler skipped the step (no update).

    Returns:
        ``{key: (P + 1,) array}``; NaN where a value is undefined.
    """
    n_layers = len(sizes)
    counts = counts.reshape(n_layers, len(COUNT_NAMES)).round().astype(np.int64)
    counts = np.vstack([counts, counts.sum(axis=0, keepdims=True)])  # (P + 1, 7), last row: all layers
    c = dict(zip(COUNT_NAMES, counts.T))
    entries = np.array([*sizes, sum(sizes)], dtype=float)
    nan = np.full(n_layers + 1, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        columns: dict[str, Any] = {"zero_count": c["zero"], "zero_fraction": c["zero"] / entries}
        released = c["released"] / c["prev_below"] if comparable else nan
        columns["released_fraction"] = released
        columns["retained_fraction"] = 1.0 - released
        columns["sign_flip_fraction"] = c["flips"] / c["both_nonzero"] if comparable else nan
        columns["minima_crossings"] = c["minima"] if comparable else nan
        columns["maxima_crossings"] = c["maxima"] if comparable else nan
        columns["sampled_entries"] = entries
    for key, values in (("grad_norm", grad_norm), ("update_norm", nan[:-1] if skipped else update_norm),
                        ("weight_norm", weight_norm)):
        columns[key] = np.append(values, np.sqrt(np.sum(np.square(values))))
    return columns


def ratio_columns(update_squares: np.ndarray, weight_squares: np.ndarray, sizes: Sequence[int],
                  skipped: bool) -> dict[str, np.ndarray]:
    """``update_ratio`` (``||dw|| / ||w||``) and ``update_rms`` (``||dw|| / sqrt(n)``) per tracked tensor and for
    all of them, from the squared norms combined over the ranks, over the same (followed) entries; NaN where the
    step made no update (skipped) or a weight norm is 0.

    Example:
        >>> c = ratio_columns(np.array([1.0, 4.0]), np.array([4.0, 16.0]), [1, 4], False)
        >>> c["update_ratio"].tolist(), c["update_rms"].tolist()
        ([0.5, 0.5, 0.5], [1.0, 1.0, 1.0])
    """
    n = len(sizes)
    if skipped:
        return {"update_ratio": np.full(n + 1, np.nan), "update_rms": np.full(n + 1, np.nan)}
    update = np.append(update_squares, update_squares.sum())
    weight = np.append(weight_squares, weight_squares.sum())
    entries = np.array([*sizes, sum(sizes)], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(weight > 0, np.sqrt(update) / np.sqrt(weight), np.nan)
        rms = np.where(entries > 0, np.sqrt(update / entries), np.nan)
    return {"update_ratio": ratio, "update_rms": rms}


def initial_columns(distance_squares: np.ndarray, initial_squares: np.ndarray) -> dict[str, np.ndarray]:
    """``init_distance`` (``||w - w_0||``) and ``relative_init_distance`` (``||w - w_0|| / ||w_0||``) per tracked
    tensor and for all of them; NaN where unknown (a skipped step) or ``||w_0|| = 0``.

    Example:
        >>> c = initial_columns(np.array([9.0, 16.0]), np.array([9.0, 0.0]))
        >>> c["init_distance"].tolist(), c["relative_init_distance"].tolist()[0]
        ([3.0, 4.0, 5.0], 1.0)
    """
    distance = np.append(distance_squares, distance_squares.sum())
    reference = np.append(initial_squares, initial_squares.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(reference > 0, np.sqrt(distance) / np.sqrt(reference), np.nan)
    return {"init_distance": np.sqrt(distance), "relative_init_distance": relative}
