"""Optimiser dynamics between two consecutive optimiser steps: zeros, release, sign flips, crossings.

Everything is integer arithmetic on ``int8`` codes, so the state kept between two steps is **one byte per
gradient entry** (`encode_previous`), and the comparison of two steps is one histogram per parameter tensor
(`transition_histogram`) from which every count is read (`counts_from_histogram`). These functions are the
reference; `GradientDynamicsMonitor` uses an equivalent, cheaper encoding with the same counts (state in
``[0, 27)``, one 243-bin histogram per tensor, optionally one compiled pass; `lightning_probes.functional._fused`).

Codes of step ``t-1`` (``int8``)::

    code  = sign(g) * k      k = 1: the update of step t-1 moved against the gradient (descent),
                             k = 2: it did not move the entry, k = 3: it moved with the gradient (ascent)
    state = code + 8 * [|g| < release_threshold]                 # in [-3, 11]

Bins of step ``t`` (``uint8``, 126 of them)::

    bin = (code + 3) + 7 * below_prev + 14 * (sign(g_t) + 1) + 42 * level_t
    level_t = [|g_t| < release_threshold] + [|g_t| < zero_threshold]   # 0, 1 or 2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

#: Order of the counts returned by `counts_from_histogram` and `transition_counts`.
COUNT_NAMES = ("zero", "prev_below", "released", "both_nonzero", "flips", "minima", "maxima")
NUM_BINS = 126


def _sign8(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x).to(torch.int8)


def _below8(magnitude: torch.Tensor, threshold: float) -> torch.Tensor:
    return (magnitude < threshold).view(torch.int8)


def gradient_codes(grad: torch.Tensor, release_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two per-entry facts of a gradient that both `transition_bins` and `encode_previous` need.

    Computed once per step and shared, they save a pass over the gradient (``abs``, a comparison and ``sign``).

    Args:
        grad: The gradient (flat).
        release_threshold: Magnitude below which the entry counts as near zero.

    Returns:
        ``(sign, below)``: ``int8`` ``sign(g)`` and ``int8`` ``[|g| < release_threshold]``.
    """
    return _sign8(grad), _below8(grad.abs(), release_threshold)


def encode_codes(sign: torch.Tensor, below: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """`encode_previous` from the `gradient_codes` of the gradient of step ``t-1`` and its update."""
    code = sign * (2 + sign * _sign8(update))  # |code| = 1 descent, 2 no move, 3 ascent; 0 if g == 0
    return code + 8 * below


def encode_previous(grad: torch.Tensor, update: torch.Tensor, release_threshold: float) -> torch.Tensor:
    """One ``int8`` per entry holding the gradient's sign, the update's direction and "below threshold".

    Args:
        grad: Gradient at step ``t-1`` (flat).
        update: ``w_t - w_{t-1}``, the update of step ``t-1`` (same shape).
        release_threshold: Magnitude below which the entry counts as near zero.

    Returns:
        ``int8`` state in ``[-3, 11]`` (see the module docstring).
    """
    return encode_codes(*gradient_codes(grad, release_threshold), update)


def transition_bins(state: torch.Tensor, grad: torch.Tensor, zero_threshold: float,
                    release_threshold: float,
                    codes: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """The bin (0..125) of every entry, from the previous state and the current gradient (``uint8``).

    ``codes``: the `gradient_codes` of ``grad``, when the caller has them already (they are computed otherwise).
    """
    if zero_threshold > release_threshold:
        raise ValueError(
            f"Expected `zero_threshold` <= `release_threshold`, but got {zero_threshold} > {release_threshold}")
    below_prev = (state + 3) >> 3  # 1 where state >= 5, i.e. the +8 flag is set
    code = state - 8 * below_prev
    sign, below = codes if codes is not None else gradient_codes(grad, release_threshold)
    level = below + _below8(grad.abs(), zero_threshold) if zero_threshold > 0 else below
    bins = (code + 3) + 7 * below_prev + 14 * (sign + 1) + 42 * level
    return bins.view(torch.uint8)


def _histogram(bins: torch.Tensor) -> torch.Tensor:
    if bins.device.type == "cpu":
        return torch.bincount(bins, minlength=NUM_BINS)
    # bincount on an accelerator reads the maximum back to the host; histc with fixed bins does not.
    return torch.histc(bins.float(), bins=NUM_BINS, min=0, max=NUM_BINS).long()


def transition_histogram(state: torch.Tensor, grad: torch.Tensor, zero_threshold: float, release_threshold: float,
                         sizes: Optional[Sequence[int]] = None,
                         codes: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Histogram of `transition_bins` per segment: ``(len(sizes), 126)``, or ``(1, 126)`` without sizes."""
    bins = transition_bins(state, grad, zero_threshold, release_threshold, codes)
    chunks = bins.split(list(sizes)) if sizes is not None else [bins]
    return torch.stack([_histogram(chunk) for chunk in chunks])


def _bin_table() -> np.ndarray:
    """``(126, 7)`` 0/1 matrix: which of `COUNT_NAMES` each bin contributes to."""
    table = np.zeros((NUM_BINS, len(COUNT_NAMES)), dtype=np.int64)
    for code in range(-3, 4):
        for below_prev in (0, 1):
            for sign in (-1, 0, 1):
                for level in (0, 1, 2):
                    b = (code + 3) + 7 * below_prev + 14 * (sign + 1) + 42 * level
                    prev_sign, kind = int(np.sign(code)), abs(code)
                    flipped = prev_sign * sign < 0
                    table[b] = [level == 2, below_prev, below_prev and level == 0, prev_sign * sign != 0,
                                flipped, flipped and kind == 1, flipped and kind == 3]
    return table


_TABLE = _bin_table()


def counts_from_histogram(histogram: np.ndarray) -> np.ndarray:
    """Turn ``(..., 126)`` histograms into ``(..., 7)`` counts in the order of `COUNT_NAMES`."""
    return np.asarray(histogram, dtype=np.int64) @ _TABLE


def transition_counts(grad_prev: torch.Tensor, update_prev: torch.Tensor, grad: torch.Tensor,
                      zero_threshold: float, release_threshold: float,
                      sizes: Optional[Sequence[int]] = None) -> np.ndarray:
    """How the gradient changed from step ``t-1`` to ``t``, per segment (one-shot convenience).

    - ``zero``: entries with ``|g_t| < zero_threshold``;
    - ``prev_below``: entries with ``|g_{t-1}| < release_threshold``;
    - ``released``: of those, entries now with ``|g_t| >= release_threshold``;
    - ``both_nonzero``: entries whose gradient is non-zero at both steps;
    - ``flips``: entries whose gradient sign changed (exact zeros excluded);
    - ``minima`` / ``maxima``: flipped entries with ``dw * dg > 0`` / ``< 0``, where ``dw = w_t - w_{t-1}``
      and ``dg = g_t - g_{t-1}``. For a flipped entry ``sign(dg) = sign(g_t) = -sign(g_{t-1})``, so the sign
      of ``dw * dg`` is set by whether step ``t-1`` moved against its gradient (a minimum was crossed along
      that coordinate) or with it (a maximum).

    Returns:
        ``(len(sizes), 7)`` (or ``(7,)`` without sizes) int64 NumPy array in the order of `COUNT_NAMES`.
    """
    state = encode_previous(grad_prev, update_prev, release_threshold)
    counts = counts_from_histogram(transition_histogram(state, grad, zero_threshold, release_threshold,
                                                        sizes).cpu().numpy())
    return counts if sizes is not None else counts[0]


def zero_threshold_for(dtype: torch.dtype, threshold: float) -> float:
    """The zero threshold actually usable for ``dtype``: at least the dtype's smallest normal number.

    fp16 cannot represent normal magnitudes below ~6.1e-5, so a threshold under the dtype's ``tiny`` is raised
    to it: there, "zero" means "flushed to (near) zero". bf16 and fp32 keep the threshold as given.
    """
    return max(threshold, torch.finfo(dtype).tiny) if dtype.is_floating_point else threshold
