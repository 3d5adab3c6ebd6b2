"""The gradient noise scale of McCandlish et al. (2018), *An Empirical Model of Large-Batch Training*, appendix A.1.

A mini-batch gradient of ``B`` samples, the mean of ``B`` independent per-sample gradients with mean ``G`` and
covariance ``Sigma``, has ``E |G_B|^2 = |G|^2 + tr(Sigma) / B``. Squared norms measured at two batch sizes
``B_small < B_big`` therefore give unbiased estimates of both terms::

    |G|^2     = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and the "simple" noise scale ``B_simple = tr(Sigma) / |G|^2``, which predicts the critical batch size (the batch
beyond which a larger batch buys little). A ratio of two single-step estimates is biased and often negative, so the
callback takes the ratio of their exponential moving averages (`ema_update`), as the paper does.

Micro-batches of unequal size: the big gradient of ``M`` micro-batches is the mean of their mean gradients (as
Lightning's accumulation and DDP's averaging make it), and ``E |G_small|^2`` averaged over the micro-batches is
``|G|^2 + tr(Sigma) * h`` with ``h = mean(1 / b_i)``, ``E |G_big|^2 = |G|^2 + tr(Sigma) * h / M``: the formulas hold
with ``B_small = 1 / h`` (the harmonic mean of the sizes) and ``B_big = M / h`` (`batch_sizes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

__all__ = ["batch_sizes", "ema_update", "noise_scale_estimates", "noise_scale_from_micro_batches",
           "noise_scale_terms", "simple_noise_scale"]

Number = Union[float, torch.Tensor]

#: Columns of `noise_scale_terms`.
TERMS = ("small_sq", "big_sq", "b_small", "b_big", "grad_sq", "trace_sigma")


def noise_scale_estimates(small_sq: Number, big_sq: Number, b_small: Number, b_big: Number) -> tuple[Number, Number]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from squared gradient norms at two batch sizes (appendix A.1).

    Args:
        small_sq: ``|G_small|^2``, the squared norm of a mean gradient over ``b_small`` samples (or the mean of
            several such squared norms).
        big_sq: ``|G_big|^2``, the squared norm of a mean gradient over ``b_big`` samples.
        b_small: The small batch size (> 0).
        b_big: The big batch size (``> b_small``; equal sizes give ``inf``/``nan``).

    Returns:
        ``(grad_sq, trace_sigma)``: ``(b_big * big_sq - b_small * small_sq) / (b_big - b_small)`` and
        ``(small_sq - big_sq) / (1 / b_small - 1 / b_big)``; floats or tensors as given. Either may be negative
        on a single draw: only their expectations are the true values.

    Example:
        >>> grad_sq, trace = noise_scale_estimates(2.0, 1.1, 10, 100)
        >>> round(grad_sq, 6), round(trace, 6)
        (1.0, 10.0)
    """
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


def simple_noise_scale(trace_sigma: Number, grad_sq: Number) -> Number:
    """``B_simple = tr(Sigma) / |G|^2`` (``nan`` where ``|G|^2 <= 0``, where no batch size is meaningful).

    Example:
        >>> simple_noise_scale(10.0, 0.5)
        20.0
    """
    if isinstance(grad_sq, torch.Tensor) or isinstance(trace_sigma, torch.Tensor):
        grad_sq = torch.as_tensor(grad_sq, dtype=torch.float64)
        trace_sigma = torch.as_tensor(trace_sigma, dtype=torch.float64, device=grad_sq.device)
        return torch.where(grad_sq > 0, trace_sigma / grad_sq, torch.full_like(grad_sq, float("nan")))
    return trace_sigma / grad_sq if grad_sq > 0 else float("nan")


def batch_sizes(micro_batches: Number, inverse_size_sum: Number) -> tuple[Number, Number]:
    """``(B_small, B_big)`` of ``micro_batches`` micro-batches whose sizes' reciprocals sum to ``inverse_size_sum``.

    ``B_small = M / sum(1 / b_i)`` (the harmonic mean of the sizes) and ``B_big = M * B_small``: with the big
    gradient the mean of the micro-batches' mean gradients, these make `noise_scale_estimates` unbiased for
    unequal sizes too (see the module docstring). Equal sizes ``b`` give ``(b, M * b)``.

    Example:
        >>> batch_sizes(4, 4 / 8)
        (8.0, 32.0)
    """
    b_small = micro_batches / inverse_size_sum
    return b_small, micro_batches * b_small


def noise_scale_terms(small_sum: torch.Tensor, micro_batches: torch.Tensor, inverse_size_sum: torch.Tensor,
                      big_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One measurement on the device: the `TERMS` row and whether it is usable, without a host synchronisation.

    Args:
        small_sum: Sum over the ``M`` micro-batches of their mean gradients' squared norms (0-d).
        micro_batches: ``M`` (0-d, float).
        inverse_size_sum: ``sum(1 / b_i)`` over the micro-batches (0-d).
        big_sq: Squared norm of the mean of the micro-batches' mean gradients (0-d).

    Returns:
        ``(row, usable)``: ``row`` is float64 ``(6,)`` ``[small_sq, big_sq, b_small, b_big, grad_sq,
        trace_sigma]`` with ``small_sq = small_sum / M``; ``usable`` (0-d bool) is false where ``M < 2`` (the two
        sizes are equal) or a term is not finite (non-finite gradients).
    """
    small_sum, big_sq = small_sum.double(), big_sq.double()
    m = micro_batches.double().to(small_sum.device)
    inverse = inverse_size_sum.double().to(small_sum.device)
    small_sq = small_sum / m.clamp_min(1.0)
    b_small, b_big = batch_sizes(m.clamp_min(1.0), inverse.clamp_min(torch.finfo(torch.float64).tiny))
    grad_sq, trace = noise_scale_estimates(small_sq, big_sq, b_small, b_big)
    row = torch.stack([small_sq, big_sq, b_small, b_big, grad_sq, trace])
    usable = (m >= 2) & torch.isfinite(row).all()
    return torch.where(usable, row, torch.zeros_like(row)), usable


def ema_update(ema: torch.Tensor, values: torch.Tensor, decay: float, usable: torch.Tensor) -> torch.Tensor:
    """Exponential moving averages with their bias correction, updated in place on the device (no sync).

    Args:
        ema: ``(n + 1,)``: the ``n`` averages, then their weight ``1 - decay**k`` after ``k`` usable updates.
        values: ``(n,)`` new values.
        decay: In ``[0, 1)``: ``ema = decay * ema + (1 - decay) * value``.
        usable: 0-d bool: update only where true (a rejected measurement leaves ``ema`` as it was).

    Returns:
        ``ema`` itself; the bias-corrected averages are ``ema[:n] / ema[n]`` (equal to the plain average for
        ``decay = 0``, and to the mean of the first value alone after one update).
    """
    step = torch.cat([values.to(ema.dtype), values.new_ones(1, dtype=ema.dtype)])
    updated = decay * ema + (1.0 - decay) * step
    ema.copy_(torch.where(usable, updated, ema))
    return ema


def noise_scale_from_micro_batches(grads: torch.Tensor, sizes: Sequence[int]) -> dict[str, float]:
    """The whole measurement from ``M`` micro-batch mean gradients, for checks and for users (host floats).

    Args:
        grads: ``(M, D)``: row ``i`` is the mean gradient over micro-batch ``i`` (flattened over every parameter).
        sizes: The ``M`` micro-batch sizes.

    Returns:
        ``{small_sq, big_sq, b_small, b_big, grad_sq, trace_sigma, b_simple}``: ``small_sq`` the mean of the rows'
        squared norms, ``big_sq`` the squared norm of their mean (the big gradient), the sizes from `batch_sizes`,
        and the two estimates with their ratio.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> out = noise_scale_from_micro_batches(g, [1, 1])
        >>> out["small_sq"], out["big_sq"], out["grad_sq"], out["trace_sigma"]
        (1.0, 0.5, 0.0, 1.0)
    """
    if grads.ndim != 2 or grads.shape[0] != len(sizes) or len(sizes) < 2:
        raise ValueError(f"Expected `grads` of shape (M, D) with M = len(sizes) >= 2, but got {tuple(grads.shape)} "
                         f"and {len(sizes)} sizes")
    g = grads.double()
    small_sq = float(g.square().sum(dim=1).mean())
    big_sq = float(g.mean(dim=0).square().sum())
    b_small, b_big = batch_sizes(float(len(sizes)), float(sum(1.0 / s for s in sizes)))
    grad_sq, trace = noise_scale_estimates(small_sq, big_sq, b_small, b_big)
    return {"small_sq": small_sq, "big_sq": big_sq, "b_small": b_small, "b_big": b_big, "grad_sq": grad_sq,
            "trace_sigma": trace, "b_simple": simple_noise_scale(trace, grad_sq)}
