"""The per-step passes of `GradientDynamicsMonitor` over a tracked set: before the optimiser step (counts, squared
gradient norms, the step's codes and the weights' compact before-copy) and after it (update and weight norms, the
new state), each by one of three paths with the same results:

- **native** (CPU, the default): the C loops of `lightning_probes.functional._native`, one pass over each
  gradient, weight and state byte; the state buffer is rewritten in place, so a compared step holds 4 bytes per
  followed float32 entry (state byte and 3 bytes of the weights' encoding) and no other per-entry memory;
- **compiled** (``compile=True``, or ``"auto"`` on long GPU fits; whole tensors of one float dtype, every entry
  followed, one process): `lightning_probes.functional._fused.fused_dynamics_before` / ``_after`` through
  ``torch.compile`` (Triton on a GPU, C++ on a CPU);
- **eager** (anything else: no C compiler, an accelerator without compiling, mixed dtypes, non-contiguous
  tensors): the reference ops of `lightning_probes.functional._fused` on slices of at most `SLICE` entries, so
  its temporaries stay bounded whatever the model's size; no host synchronisation.

Counts and codes are identical on every path; norms agree to float rounding (summed in float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lightning_probes.callbacks._entries import EntrySelection
from lightning_probes.functional import _native
from lightning_probes.functional._fused import (
    FusedKernel,
    dynamics_after_one,
    dynamics_before_one,
    exponent_max,
    weight_planes,
)

#: Most entries one eager slice covers (its float temporaries: a few times 4 bytes per entry of the slice).
SLICE = 1 << 20


def planes_dtype(params: list[torch.Tensor]) -> torch.dtype:
    """The dtype the weights' before-copy is kept in: theirs when all share one float dtype, else float64."""
    dtype = params[0].dtype
    return dtype if all(p.dtype == dtype for p in params) else torch.float64


@dataclass
class Buffers:
    """A compared step's per-entry memory: the state byte buffer and the weights' encoding planes.

    Attributes:
        state: ``int8`` ``(N,)``: the previous state on entry, the step's codes after the first pass, the new state
            after the second (the same storage throughout).
        planes: ``(p16, p8, c64)`` of `lightning_probes.functional._fused.weight_planes` (``None`` where unused).
        dtype: The dtype the weights are encoded as (`planes_dtype`).
        eref: ``(P,)`` int32: per tensor the largest exponent of its followed float32 weights (the encoding's
            reference, `lightning_probes.functional._fused.exponent_max`).
    """

    state: torch.Tensor
    planes: tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]
    dtype: torch.dtype
    eref: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held (state and planes)."""
        tensors = [self.state, *self.planes]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _views(flat: Optional[torch.Tensor], start: int, stop: int) -> Optional[torch.Tensor]:
    return None if flat is None else flat[start:stop]


def _pieces(selection: EntrySelection) -> list[tuple[int, int, int, int]]:
    """``(tensor, start, stop, offset)`` slices of at most `SLICE` followed entries (offset: into the flat buffers)."""
    pieces, offset = [], 0
    for k, size in enumerate(selection.sizes):
        for start in range(0, size, SLICE):
            stop = min(size, start + SLICE)
            pieces.append((k, start, stop, offset + start))
        offset += size
    return pieces


def _followed(tensor: torch.Tensor, index: Optional[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    flat = tensor.reshape(-1)
    return flat[start:stop] if index is None else flat[index[start:stop]]


class DynamicsPasses:
    """The two passes of a step over one tracked set, by the native, compiled or eager path (module docstring).

    Args:
        kernel_before: The probe's compiled-kernel wrapper of the first pass.
        kernel_after: The same for the second pass.
    """

    def __init__(self, kernel_before: FusedKernel, kernel_after: FusedKernel) -> None:
        self.kernel_before = kernel_before
        self.kernel_after = kernel_after
        self._groups: dict[tuple[tuple[int, ...], int], _native.Group] = {}

    def reset(self) -> None:
        self._groups = {}

    def _group(self, selection: EntrySelection) -> _native.Group:
        key = (tuple(selection.sizes), id(selection))
        if key not in self._groups:
            if len(self._groups) > 16:
                self._groups.clear()
            self._groups[key] = _native.Group(selection.sizes, selection.local_index, selection.sample_local)
        return self._groups[key]

    @staticmethod
    def native(grads: list[torch.Tensor], params: list[torch.Tensor]) -> bool:
        """Whether the C loops take these tensors (CPU, contiguous, one known dtype each, the library built)."""
        return (grads[0].device.type == "cpu" and _native.supports(grads) and _native.supports(params)
                and _native.available())

    def compiled(self, grads: list[torch.Tensor], params: list[torch.Tensor], kernel: FusedKernel,
                 whole: bool) -> bool:
        """Whether ``kernel`` runs: active, whole tensors, all float32 or all float64 (gradients and weights)."""
        if not kernel.active or not whole:
            return False
        dtype = grads[0].dtype
        return (dtype in (torch.float32, torch.float64) and all(t.dtype == dtype for t in grads)
                and all(p.dtype == dtype for p in params))

    # -- before the step ----------------------------------------------------------------------------------
    def before(self, grads: list[torch.Tensor], params: list[torch.Tensor], selection: EntrySelection,
               state: Optional[torch.Tensor], zero_threshold: float, release_threshold: float,
               scale: Optional[torch.Tensor], whole: bool
               ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Buffers]:
        """The first pass: ``(counts, squares, sample, buffers)``.

        Args:
            grads: This rank's local gradients of the tracked tensors.
            params: Their local weights (before the step).
            selection: The followed entries (`lightning_probes.callbacks._entries.select_entries`).
            state: The previous step's ``int8`` state (rewritten in place), or ``None``.
            zero_threshold: The dtype-aware zero threshold.
            release_threshold: The release threshold.
            scale: ``1 / loss scale`` when the gradients are still scaled, else ``None``.
            whole: Every entry followed and one process holds whole tensors (the compiled path may run).

        Returns:
            ``(P, 7)`` int64 counts (the last six meaningless without a state), ``(P,)`` float64 sums of the
            squared unscaled gradients over the followed entries (``None``: not computed here), the values of
            ``selection.sample_local`` as compared (float64; ``None``: not read here, see `sample_of`) and the
            buffers.
        """
        device = grads[0].device
        total = sum(selection.sizes)
        has_previous = state is not None
        buffer = state if has_previous else torch.empty(total, dtype=torch.int8, device=device)
        dtype = planes_dtype(params)
        planes = weight_planes(dtype, total, device)
        buffers = Buffers(buffer, planes, dtype, torch.zeros(len(grads), dtype=torch.int32, device=device))
        if self.compiled(grads, params, self.kernel_before, whole) and scale is None:
            states = list(buffer.split(selection.sizes)) if has_previous else None
            counts, squares, codes, parts, erefs = self.kernel_before(grads, states, params, zero_threshold,
                                                                      release_threshold)
            buffers.eref.copy_(erefs)
            offset = 0
            for code, part, size in zip(codes, parts, selection.sizes):
                buffer[offset:offset + size].copy_(code)
                for flat, piece in zip(planes, part):
                    if flat is not None:
                        flat[offset:offset + size].copy_(piece)
                offset += size
            return counts.long(), squares, None, buffers
        if self.native(grads, params) and dtype == params[0].dtype:
            counts, squares, sample = _native.dynamics_before(
                self._group(selection), grads, buffer, has_previous, params, planes, buffers.eref, zero_threshold,
                release_threshold, None if scale is None else float(scale))
            return counts, squares, sample, buffers
        counts = torch.zeros(len(grads), 7, dtype=torch.int64, device=device)
        pieces = _pieces(selection)
        if dtype == torch.float32:  # the encoding's reference exponent of each tensor, over all its followed entries
            for k, start, stop, _ in pieces:
                part = exponent_max(_followed(params[k], selection.local_index[k], start, stop))
                buffers.eref[k] = torch.maximum(buffers.eref[k], part.to(torch.int32))
        eref = buffers.eref.to(torch.int64)
        for k, start, stop, offset in pieces:
            index = selection.local_index[k]
            weight = _followed(params[k], index, start, stop)
            part_state = buffer[offset:offset + stop - start] if has_previous else None
            row, _, byte, parts = dynamics_before_one(
                _followed(grads[k], index, start, stop), part_state, weight.to(dtype), zero_threshold,
                release_threshold, scale, eref[k])
            counts[k] += row
            buffer[offset:offset + stop - start].copy_(byte)
            for flat, piece in zip(planes, parts):
                if flat is not None:
                    flat[offset:offset + stop - start].copy_(piece.view(flat.dtype))
        return counts, None, None, buffers

    # -- after the step -----------------------------------------------------------------------------------
    def after(self, params: list[torch.Tensor], selection: EntrySelection, buffers: Buffers, snapshot: bool,
              norms: bool, whole: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The second pass: the new state written into ``buffers.state`` (``snapshot``), and ``(update_squares,
        weight_squares)`` ``(P,)`` float64 over the followed entries (``norms``; ``weight_squares`` ``None``:
        not computed here)."""
        device = buffers.state.device
        planes = buffers.planes
        if self.compiled(params, params, self.kernel_after, whole) and buffers.dtype == params[0].dtype:
            codes = list(buffers.state.split(selection.sizes))
            parts = [tuple(None if f is None else f[o:o + n] for f in planes)
                     for o, n in zip(_offsets(selection.sizes), selection.sizes)]
            states, updates, squares = self.kernel_after(params, codes, parts, buffers.eref.to(torch.int64))
            if snapshot:
                torch.cat(states, out=buffers.state)
            return updates, squares
        if self.native(params, params) and buffers.dtype == params[0].dtype:
            updates, squares = _native.dynamics_after(self._group(selection), params, buffers.state, planes,
                                                      buffers.eref, snapshot, norms)
            return updates, squares
        updates = torch.zeros(len(params), dtype=torch.float64, device=device)
        eref = buffers.eref.to(torch.int64)
        for k, start, stop, offset in _pieces(selection):
            weight = _followed(params[k], selection.local_index[k], start, stop).to(buffers.dtype)
            byte = buffers.state[offset:offset + stop - start]
            parts = tuple(_views(f, offset, offset + stop - start) for f in planes)
            state, update, _ = dynamics_after_one(weight, byte, parts, eref[k])
            if snapshot:
                byte.copy_(state)
            updates[k] += update
        return updates, None


def _offsets(sizes: list[int]) -> list[int]:
    out, offset = [], 0
    for size in sizes:
        out.append(offset)
        offset += size
    return out


def sample_of(grads: list[torch.Tensor], selection: EntrySelection, dtype: torch.dtype,
              scale: Optional[torch.Tensor], values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The step's sign-map columns read from the gradients (in ``dtype``, unscaled; ``values``: already read, in
    the order of ``selection.sample_local``); under FSDP2 those this rank holds, zeros elsewhere (summed over the
    ranks later)."""
    if values is None:
        values = torch.cat([g.reshape(-1)[i] for g, i in zip(grads, selection.sample_local)]).to(dtype)
        if scale is not None:
            values = values * scale.to(dtype)
    else:
        values = values.to(dtype)
    if selection.sample_dst is None:
        return values
    return torch.zeros(selection.n_sample, dtype=dtype, device=values.device).index_copy_(
        0, selection.sample_dst, values)
