"""Which gradient entries `GradientDynamicsMonitor` follows, and where this rank finds them.

Two index spaces:

- **selected entries** of a tensor: all of its entries, or with ``max_entries`` a seeded fixed subset of
  ``max_entries`` of them (sorted positions in the full flat tensor, drawn once, the same at every step and on
  every rank). The sign-map columns are picked evenly over the concatenation of every tensor's selected entries.
- **this rank's part**: under FSDP2 a rank holds a contiguous slice of each full flat tensor (`ShardLayout`), so
  it holds a contiguous range ``[k0, k1)`` of each tensor's selected entries; a replicated tensor counts on
  rank 0 only. Without sharding the range is everything.

`EntrySelection` turns both into index tensors on the gradients' device, built once per tracked set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from lightning_probes.sharding import ShardLayout

#: Bytes one followed entry costs between steps: the int8 state (overwritten in place at a compared step).
_STATE_BYTES = 1


def draw_subsets(numels: Sequence[int], max_entries: Optional[int], seed: int) -> list[Optional[np.ndarray]]:
    """Per tensor: ``None`` (all entries) or the sorted positions of a seeded subset of ``max_entries``.

    Drawn without replacement by NumPy's ``Generator.choice`` (Floyd's algorithm for small subsets of large
    tensors: memory grows with the subset, not the tensor); tensor ``i`` uses the stream ``(seed, i)``, so the
    subset of a tensor does not depend on the others. Positions are ``int32`` when they fit.
    """
    subsets: list[Optional[np.ndarray]] = []
    for i, numel in enumerate(numels):
        if max_entries is None or numel <= max_entries:
            subsets.append(None)
            continue
        rng = np.random.default_rng([seed, i])
        picks = np.sort(rng.choice(numel, size=max_entries, replace=False, shuffle=False))
        subsets.append(picks.astype(np.int32 if numel < 2**31 else np.int64))
    return subsets


def bytes_per_entry(itemsize: int) -> int:
    """Peak bytes per followed entry at a compared step: the state byte (rewritten in place with the step's codes,
    then the new state) and the weights' before-copy (`lightning_probes.functional._fused.planes_bytes`: 3 bytes
    for float32 weights, 2 for 16-bit ones, 8 for float64).

    Example:
        >>> bytes_per_entry(4), bytes_per_entry(2), bytes_per_entry(8)
        (4, 3, 9)
    """
    return _STATE_BYTES + {4: 3, 8: 8}.get(itemsize, 2)


def auto_max_entries(numels: Sequence[int], itemsize: int, fraction: float = 0.1) -> int:
    """The largest per-tensor cap whose peak memory (`bytes_per_entry`) stays within ``fraction`` of the
    parameters' own memory (``itemsize`` bytes each).

    Example:
        >>> auto_max_entries([1000, 10], itemsize=4)  # budget 404 bytes / 4 bytes per entry = 101 entries
        91
    """
    budget = fraction * itemsize * sum(numels) / bytes_per_entry(itemsize)
    low, high = 1, max(numels)
    while low < high:  # the largest cap c with sum(min(n, c)) <= budget
        mid = (low + high + 1) // 2
        if sum(min(n, mid) for n in numels) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


@dataclass
class EntrySelection:
    """Index tensors of one tracked set on one device (see the module docstring).

    Attributes:
        local_index: Per tensor, positions of this rank's selected entries in its local flat tensor (``None``:
            every local entry, no gather).
        sizes: Per tensor, the number of this rank's selected entries (the split of the flat selected vector).
        sample_src: Positions, in the flat vector of this rank's selected gradient entries, of the sign-map
            columns this rank holds.
        sample_dst: Their positions in the step's sample vector (``None``: ``sample_src`` covers every column in
            order, no scatter needed).
        n_sample: Length of the step's sample vector (every sign-map column of the tracked tensors).
        row: Columns of the sample vector's entries in a sign-map row.
        tensor_index: Per tensor, positions of its sign-map columns in its own selected flat vector (only without
            sharding).
        sample_local: Per tensor, positions in its local flat tensor of the sign-map columns this rank holds (in
            the order of ``sample_src``): the step's sample is read from the gradients themselves.
    """

    local_index: list[Optional[torch.Tensor]]
    sizes: list[int]
    sample_src: torch.Tensor
    sample_dst: Optional[torch.Tensor]
    n_sample: int
    row: np.ndarray
    tensor_index: list[torch.Tensor]
    sample_local: list[torch.Tensor]


def select_entries(tracked: Sequence[int], layouts: Sequence[ShardLayout], subsets: Sequence[Optional[np.ndarray]],
                   columns: Sequence[torch.Tensor], column_offsets: Sequence[int], device: torch.device,
                   sharded: bool) -> EntrySelection:
    """Build the `EntrySelection` of the ``tracked`` tensors on ``device``.

    Args:
        tracked: Indices of the tracked tensors of the step, in order.
        layouts: Per tensor (all of them), this rank's `ShardLayout`.
        subsets: Per tensor, `draw_subsets`' positions or ``None``.
        columns: Per tensor, the positions (in its selected entries) of its sign-map columns.
        column_offsets: Per tensor, where its columns start in a sign-map row.
        device: The gradients' device.
        sharded: Whether ranks hold parts of tensors (FSDP2).
    """
    local_index: list[Optional[torch.Tensor]] = []
    sizes, src, dst, rows, per_tensor, local = [], [], [], [], [], []
    local_offset = sample_offset = 0
    for i in tracked:
        layout, subset, cols = layouts[i], subsets[i], columns[i]
        if not layout.owner:
            k0 = k1 = 0
            index: Optional[torch.Tensor] = torch.zeros(0, dtype=torch.long, device=device)
        elif subset is None:
            k0, k1 = layout.start, layout.start + layout.numel
            index = None
        else:
            k0 = int(np.searchsorted(subset, layout.start))
            k1 = int(np.searchsorted(subset, layout.start + layout.numel))
            index = torch.from_numpy(subset[k0:k1] - layout.start).to(device)
        local_index.append(index)
        sizes.append(k1 - k0)
        held = (cols >= k0) & (cols < k1)
        src.append(cols[held] - k0 + local_offset)
        positions = (cols[held] - k0).to(device)  # in this rank's selected entries of the tensor
        local.append(positions if index is None else index[positions].to(torch.long))
        dst.append(torch.nonzero(held).reshape(-1) + sample_offset)
        per_tensor.append(cols)
        rows.append(column_offsets[i] + np.arange(len(cols)))
        local_offset += k1 - k0
        sample_offset += len(cols)
    return EntrySelection(
        local_index=local_index, sizes=sizes, sample_src=torch.cat(src).to(device),
        sample_dst=torch.cat(dst).to(device) if sharded else None, n_sample=sample_offset,
        row=np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64),
        tensor_index=[c.to(device) for c in per_tensor], sample_local=local)


def pick_columns(selected_counts: Sequence[int], max_columns: int) -> tuple[list[torch.Tensor], list[int], int]:
    """Sign-map columns picked evenly over the concatenated selected entries.

    Returns:
        ``(columns, column_offsets, n_columns)``: per tensor the picked positions in its selected entries (CPU
        int64) and where they start in a map row, and the row length.
    """
    total = sum(selected_counts)
    picks = torch.unique(torch.linspace(0, total - 1, min(max_columns, total)).round().long())
    offsets = np.cumsum([0, *selected_counts])
    columns, column_offsets = [], []
    for i in range(len(selected_counts)):
        columns.append(picks[(picks >= offsets[i]) & (picks < offsets[i + 1])] - int(offsets[i]))
        column_offsets.append(int(np.searchsorted(picks.numpy(), offsets[i])))
    return columns, column_offsets, len(picks)


def gather_selected(tensors: Sequence[torch.Tensor], selection: EntrySelection) -> torch.Tensor:
    """The flat vector of this rank's selected entries of ``tensors`` (local shards), in order (a copy)."""
    parts = [t.reshape(-1) if index is None else t.reshape(-1)[index]
             for t, index in zip(tensors, selection.local_index)]
    return torch.cat(parts)


def megabytes(n: float) -> str:
    """``n`` bytes as a short human-readable string."""
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
