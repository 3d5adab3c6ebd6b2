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
partials). Every reduction runs on the tensor's device; nothing is copied to the host. Sums are float64.
"""

from __future__ import annotations

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


def outlier_partials(x: torch.Tensor, channel_dim: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts of `activation_outliers` that add or maximise over disjoint pieces of a batch.

    Args:
        x: A floating-point layer output (any shape, at least one entry).
        channel_dim: The channel dimension (see `channel_dim_for`); ``None``: one channel.

    Returns:
        ``(sums, channel_max)``: ``sums`` a float64 ``(2,)`` tensor ``[sum(x**2), n]``, ``channel_max`` a float32
        (float64 for float64 outputs) ``(C,)`` tensor of the per-channel ``max |x|``; both on ``x``'s device.
        Computed without a copy of ``x`` in float64 (a float16/bfloat16 output is reduced in float32).
    """
    x = x.detach()
    dtype = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    sum_sq = torch.linalg.vector_norm(x, 2, dtype=dtype).double().square()
    sums = torch.stack([sum_sq, torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])
    if channel_dim is None:
        channel_max = torch.maximum(x.amax(), x.amin().neg()).reshape(1)
    else:
        dims = tuple(d for d in range(x.ndim) if d != channel_dim % x.ndim)
        # max |x| = max(max x, -min x): two reductions, no |x| copy of the output.
        channel_max = torch.maximum(x.amax(dim=dims), x.amin(dim=dims).neg())
    return sums, channel_max.to(dtype)


def exceed_count(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``#{|x| > threshold}`` as a float64 0-d tensor on ``x``'s device (``threshold`` a 0-d tensor there: no
    host synchronisation)."""
    x = x.detach()
    threshold = threshold.to(torch.float32 if x.dtype in _LOW_PRECISION else x.dtype)
    if x.dtype in _LOW_PRECISION:
        x = x.float()
    above = torch.count_nonzero(x > threshold) + torch.count_nonzero(x < -threshold)
    return above.double()


def outlier_stats(sums: torch.Tensor, exceed: torch.Tensor, channel_max: torch.Tensor) -> torch.Tensor:
    """The statistics from (combined) partials, as one float64 tensor on their device.

    Args:
        sums: ``[sum(x**2), n]`` (`outlier_partials`, summed over the pieces).
        exceed: Entries above ``k * rms`` (`exceed_count` with the combined RMS, summed).
        channel_max: Per-channel ``max |x|`` (maximised over the pieces).

    Returns:
        ``[rms, max_abs, exceed_fraction, channel_max_ratio, top_channel]`` (float64, ``(5,)``); a ratio over a
        zero median is ``inf``; a non-finite output gives non-finite values.
    """
    n = sums[1].clamp_min(1.0)
    rms = (sums[0] / n).sqrt()
    channel_max = channel_max.double()
    top = channel_max.max()
    index = channel_max.argmax().double()
    median = torch.quantile(channel_max, 0.5) if channel_max.numel() > 1 else channel_max[0]
    ratio = top / median  # inf for a zero median (an all-zero channel majority), nan for 0/0
    return torch.stack([rms, top, exceed.double() / n, ratio, index])


def activation_outliers(x: torch.Tensor, k: float = 10.0, channel_dim: Optional[int] = -1) -> dict[str, float]:
    """Every statistic of one layer output in one process (see the module docstring).

    Args:
        x: A floating-point layer output.
        k: The multiple of the RMS above which an entry counts in ``exceed_fraction``.
        channel_dim: The channel dimension (``-1``: the last; ``1``: channel first; ``None``: one channel).

    Returns:
        ``{"rms", "max_abs", "exceed_fraction", "channel_max_ratio", "top_channel", "numel"}`` as Python numbers.

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
            "top_channel": int(values[4]), "numel": int(x.numel())}
