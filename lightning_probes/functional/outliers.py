"""Activation outliers of one layer output: RMS, max |x|, the share above ``k`` x RMS, the massive-channel ratio.

The statistics of `activation_outliers`, over every entry ``x`` of a layer output (``n`` entries, ``C`` channels):

- ``rms = sqrt(sum(x**2) / n)``;
- ``max_abs = max |x|``;
- ``exceed_fraction = #{|x| > k * rms} / n`` (strictly above);
- per channel ``c``: ``m_c = max |x|`` over the entries of that channel; ``channel_max_ratio = max_c m_c /
  median_c m_c`` (the median as NumPy's: the mean of the two middle values for an even ``C``) and
  ``top_channel = argmax_c m_c`` (the first on ties). Infinite (``null`` in records) when the median is 0.

The channel of an entry is given by ``channel_dim``: the last dimension of ``(N, C)`` and ``(N, T, C)`` outputs,
dimension 1 of channel-first ``(N, C, H, W)`` outputs; ``None`` (outputs of fewer than 2 dimensions) makes the
whole output one channel.

The computation is split so that several processes can combine it exactly (`lightning_probes.callbacks.
activation_outliers`): `outlier_partials` (sum of squares, entries, per-channel maxima; summed and maximised over
ranks), `exceed_count` (entries above a threshold; summed), and `outlier_stats` (the statistics from the combined
partials). Every reduction runs on the tensor's device; nothing is copied to the host, and no copy of the output
is made (low-precision outputs are reduced piece by piece). Sums are float64.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["activation_outliers", "channel_dim_for", "exceed_count", "outlier_partials", "outlier_stats"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def channel_dim_for(ndim: int, channel_first: bool) -> Optional[int]:
    """The channel dimension of an output of ``ndim`` dimensions: ``None`` below 2 dimensions (one channel), 1 for
    a channel-first output of 3 or more dimensions, else the last dimension."""
    if ndim < 2:
        return None
    return 1 if channel_first and ndim >= 3 else ndim - 1


#: Entries per piece of a reduction that needs a temporary (a float32 copy of a low-precision output, a mask).
_PIECE = 1 << 24


def _pieces(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` as views of at most about `_PIECE` entries (flat pieces of a contiguous tensor, else slices of
    dimension 0), so that a temporary made per piece stays bounded."""
    n = x.numel()
    if n <= _PIECE:
        return [x]
    if x.is_contiguous():
        flat = x.view(-1)
        return [flat[i:i + _PIECE] for i in range(0, n, _PIECE)]
    return list(x.split(max(1, _PIECE * x.shape[0] // n), dim=0))


def outlier_partials(x: torch.Tensor, channel_dim: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts of `activation_outliers` that add or maximise over disjoint pieces of a batch.

    Args:
        x: A floating-point layer output (any shape, at least one entry).
        channel_dim: The channel dimension (see `channel_dim_for`); ``None``: one channel.

    Returns:
        ``(sums, channel_max)``: ``sums`` a float64 ``(2,)`` tensor ``[sum(x**2), n]``, ``channel_max`` a
        ``(C,)`` tensor of the per-channel ``max |x|`` in ``x``'s dtype; both on ``x``'s device, with no host
        synchronisation. No copy of ``x`` is made: a float16/bfloat16 output's sum of squares is accumulated in
        float32 over pieces of at most 2**24 entries (the float32 copy of one piece is the only temporary).
    """
    x = x.detach()
    if x.dtype in _LOW_PRECISION:
        parts = [torch.linalg.vector_norm(p, 2, dtype=torch.float32).double() for p in _pieces(x)]
        sum_sq = torch.stack(parts).square().sum() if len(parts) > 1 else parts[0].square()
    else:
        sum_sq = torch.linalg.vector_norm(x, 2).double().square()
    sums = torch.stack([sum_sq, sum_sq.new_full((), float(x.numel()))])
    if channel_dim is None:
        channel_max = torch.maximum(x.amax(), x.amin().neg()).reshape(1)
    else:
        dims = tuple(d for d in range(x.ndim) if d != channel_dim % x.ndim)
        # max |x| = max(max x, -min x): two reductions, no |x| copy of the output.
        channel_max = torch.maximum(x.amax(dim=dims), x.amin(dim=dims).neg())
    return sums, channel_max


def _round_down(threshold: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest value of ``dtype`` at most ``threshold``: for ``x`` of that dtype, ``x > threshold`` exactly when
    ``x > _round_down(threshold)``, so the comparison needs no upcast copy of ``x``."""
    exact = threshold.double()
    low = exact.to(dtype)
    return torch.where(low.double() > exact, torch.nextafter(low, torch.full_like(low, -math.inf)), low)


def exceed_count(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``#{|x| > threshold}`` (exact, the threshold taken in float64) as a float64 0-d tensor on ``x``'s device;
    ``threshold`` a 0-d tensor there, so no host synchronisation. Counted over pieces of at most 2**24 entries
    (a copy of one piece in ``x``'s dtype is the only temporary)."""
    x = x.detach()
    limit = _round_down(threshold, x.dtype)
    # sign(|x| - limit) clamped at 0 is 1 exactly where |x| > limit (a difference of two floats of one dtype is
    # positive exactly when the first is larger); its float32 sum is exact for a piece of at most 2**24 entries.
    # Four float passes: about 4x faster on a CPU than two boolean masks and their counts.
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    counts = [p.abs().sub_(limit).sign_().clamp_min_(0).sum(dtype=dtype) for p in _pieces(x)]
    return (torch.stack(counts).double().sum() if len(counts) > 1 else counts[0].double())


def outlier_stats(sums: torch.Tensor, exceed: torch.Tensor, channel_max: torch.Tensor) -> torch.Tensor:
    """The statistics from (combined) partials, of one layer or of several at once, as float64 on their device.

    Args:
        sums: ``[sum(x**2), n]`` (`outlier_partials`, summed over the pieces): ``(2,)``, or ``(L, 2)`` for ``L``
            layers.
        exceed: Entries above ``k * rms`` (`exceed_count` with the combined RMS, summed): ``()`` or ``(L,)``.
        channel_max: Per-channel ``max |x|`` (maximised over the pieces): ``(C,)``, or ``(L, C)`` with ``nan``
            after the last channel of a layer narrower than ``C``.

    Returns:
        ``[rms, max_abs, exceed_fraction, channel_max_ratio, top_channel]`` (float64, ``(5,)`` or ``(L, 5)``); a
        ratio over a zero median is ``inf`` (``nan`` for 0/0); every statistic of a layer whose sum of squares is
        not finite (a ``nan``/``inf`` entry) is ``nan``.
    """
    n = sums[..., 1].clamp_min(1.0)
    rms = (sums[..., 0] / n).sqrt()
    m = channel_max.double()
    top, index = torch.where(m.isnan(), -math.inf, m).max(dim=-1)  # the first channel on ties
    median = torch.nanquantile(m, 0.5, dim=-1)  # NumPy's median of the layer's channels
    out = torch.stack([rms, top, exceed.double() / n, top / median, index.double()], dim=-1)
    return torch.where(sums[..., :1].isfinite(), out, math.nan)


def activation_outliers(x: torch.Tensor, k: float = 10.0, channel_dim: Optional[int] = -1) -> dict[str, float]:
    """Every statistic of one layer output in one process (see the module docstring).

    Args:
        x: A floating-point layer output.
        k: The multiple of the RMS above which an entry counts in ``exceed_fraction``.
        channel_dim: The channel dimension (``-1``: the last; ``1``: channel first; ``None``: one channel).

    Returns:
        ``{"rms", "max_abs", "exceed_fraction", "channel_max_ratio", "top_channel", "numel"}`` as Python numbers
        (``nan``, and ``top_channel`` ``None``, for an output with a non-finite entry).

    Example:
        >>> x = torch.ones(4, 3)
        >>> x[0, 2] = 100.0
        >>> stats = activation_outliers(x, k=3.0)
        >>> stats["top_channel"], stats["channel_max_ratio"], stats["exceed_fraction"]
        (2, 100.0, 0.08333333333333333)
    """
    if x.ndim < 2:
        channel_dim = None
    sums, channel_max = outlier_partials(x, channel_dim)
    rms = (sums[0] / sums[1].clamp_min(1.0)).sqrt()
    values = outlier_stats(sums, exceed_count(x, k * rms), channel_max).tolist()
    return {"rms": values[0], "max_abs": values[1], "exceed_fraction": values[2], "channel_max_ratio": values[3],
            "top_channel": None if math.isnan(values[4]) else int(values[4]), "numel": int(x.numel())}
