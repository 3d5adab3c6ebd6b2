"""Optimiser dynamics between two consecutive optimiser steps: zeros, release, sign flips, crossings.

The state kept between steps is one ``int8`` per gradient entry (`encode_previous`) and one ``bool``
(below the release threshold): two bytes per tracked entry, never a float copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

#: Row order of the counts returned by `transition_counts`.
COUNT_NAMES = ("zero", "prev_below", "released", "both_nonzero", "flips", "minima", "maxima")

_ZERO_UPDATE, _DESCENT, _ASCENT = 1, 2, 3


def encode_previous(grad: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Pack the sign of ``grad`` and the direction of the ``update`` that followed it into one ``int8``.

    ``code = sign(g) * k`` with ``k = 2`` when the update moved against the gradient (descent along that
    coordinate), ``k = 3`` when it moved with it (ascent), ``k = 1`` when the entry did not move. A zero
    gradient gives 0.

    Args:
        grad: Gradient at step ``t-1`` (any shape).
        update: ``w_t - w_{t-1}``, the update of step ``t-1`` (same shape).

    Returns:
        ``int8`` tensor of the same shape.
    """
    g_sign = torch.sign(grad).to(torch.int8)
    u_sign = torch.sign(update).to(torch.int8)
    product = g_sign * u_sign  # -1 descent, +1 ascent, 0 no move (or zero gradient)
    kind = torch.where(product < 0, _DESCENT, torch.where(product > 0, _ASCENT, _ZERO_UPDATE)).to(torch.int8)
    return g_sign * kind


def transition_counts(
    previous_code: torch.Tensor,
    previous_below: torch.Tensor,
    grad: torch.Tensor,
    zero_threshold: float,
    release_threshold: float,
    sizes: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Counts describing how the gradient changed from step ``t-1`` to step ``t`` (flat tensors).

    With ``g`` the gradient at ``t`` and the previous step described by `encode_previous`:

    - ``zero``: entries with ``|g| < zero_threshold``;
    - ``prev_below``: entries with ``|g_{t-1}| < release_threshold``;
    - ``released``: of those, entries now with ``|g| >= release_threshold``;
    - ``both_nonzero``: entries whose gradient is non-zero at both steps;
    - ``flips``: entries whose gradient sign changed (exact zeros excluded);
    - ``minima`` / ``maxima``: flipped entries with ``dw * dg > 0`` / ``< 0``, where ``dw = w_t - w_{t-1}``
      and ``dg = g_t - g_{t-1}``. For a flipped entry ``sign(dg) = sign(g_t) = -sign(g_{t-1})``, so the sign
      of ``dw * dg`` is fixed by whether step ``t-1`` moved against its gradient (a minimum was crossed along
      that coordinate) or with it (a maximum).

    Args:
        previous_code: ``int8`` codes from `encode_previous` for step ``t-1``.
        previous_below: ``bool``, ``|g_{t-1}| < release_threshold``.
        grad: Gradient at step ``t`` (flattened, same length).
        zero_threshold: Entries below this magnitude count as zero.
        release_threshold: Entries below this magnitude count as "near zero" for release and retention.
        sizes: Lengths of consecutive segments (one per parameter tensor) to count separately.

    Returns:
        ``int64`` tensor of shape ``(7,)`` in the order of `COUNT_NAMES`, or ``(len(sizes), 7)``.
    """
    magnitude = grad.abs()
    below = magnitude < release_threshold
    g_sign = torch.sign(grad).to(torch.int8)
    prev_sign = torch.sign(previous_code)
    product = prev_sign * g_sign
    flipped = product < 0
    kind = previous_code.abs()
    rows = torch.stack([
        magnitude < zero_threshold,
        previous_below,
        previous_below & ~below,
        product != 0,
        flipped,
        flipped & (kind == _DESCENT),
        flipped & (kind == _ASCENT),
    ])  # (7, N) bool
    return segment_sums(rows, sizes)


def segment_sums(rows: torch.Tensor, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Sum ``rows`` ``(K, N)`` over consecutive column segments: ``(len(sizes), K)``, or ``(K,)`` without sizes."""
    if sizes is None:
        return rows.sum(dim=1)
    return torch.stack([chunk.sum(dim=1) for chunk in rows.split(list(sizes), dim=1)])


def zero_counts(grad: torch.Tensor, zero_threshold: float, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Number of entries with ``|g| < zero_threshold``, per segment when ``sizes`` is given."""
    return segment_sums((grad.abs() < zero_threshold).unsqueeze(0), sizes)[..., 0]


def default_zero_threshold(dtype: torch.dtype, threshold: float) -> float:
    """The zero threshold actually usable for ``dtype``: at least the dtype's smallest normal number.

    bf16 and fp16 cannot represent magnitudes much below ``1e-7`` (fp16's smallest normal is ~6.1e-5), so a
    threshold under the dtype's ``tiny`` is raised to it: there, "zero" means "flushed to (near) zero".
    """
    return max(threshold, torch.finfo(dtype).tiny) if dtype.is_floating_point else threshold
