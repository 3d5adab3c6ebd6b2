"""Linearised distance of a prediction to the decision boundary, and what it predicts about noise stability.

For a classifier ``f`` with logits ``z = f(x)`` and predicted class ``p = argmax z``, the margin to a competitor
``j`` is ``m_j = z_p - z_j``; linearising ``f`` at ``x`` puts the boundary between ``p`` and ``j`` at the distance
``d_j = m_j / ||grad_x m_j||`` (Elsayed et al., "Large Margin Deep Networks for Classification", NeurIPS 2018).
For a locally linear model with two classes, Gaussian noise ``N(0, sigma^2 I)`` keeps the prediction with
probability ``Phi(d / sigma)``; with several competitors ``Phi(min_j d_j / sigma)`` is the randomized-smoothing
relation (Cohen et al., ICML 2019) used here as a no-training predictor of the stability ratio.

The gradients come from one Jacobian per sample (``torch.func.jacrev`` under ``torch.func.vmap``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

__all__ = ["boundary_distances", "linear_stability"]


def boundary_distances(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
                       chunk_size: Optional[int] = 256) -> dict[str, torch.Tensor]:
    """Margins, margin-gradient norms and linearised boundary distances of every sample to every competitor.

    Args:
        fn: Maps a batch ``(B, *shape)`` to logits ``(B, C)``, ``C >= 2``; called on batches of one under
            ``vmap``, so it must not mix samples (put a model with batch norm in ``eval()`` mode).
        x: Inputs ``(N, *shape)``.
        chunk_size: Samples per ``vmap`` call (bounds the memory of the ``(chunk, C, *shape)`` Jacobian);
            ``None``: all at once.

    Returns:
        ``logits`` ``(N, C)``; ``pred`` ``(N,)``; ``margin`` ``(N, C)`` (``z_pred - z_j``, 0 at the prediction);
        ``grad_norm`` ``(N, C)`` (``||grad_x (z_pred - z_j)||``, 0 at the prediction); ``distance`` ``(N, C)``
        (``margin / grad_norm``, ``+inf`` at the prediction and where the gradient vanishes); ``min_distance``
        ``(N,)`` (the nearest competitor's). All float64 except ``pred``.

    Example:
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> out = boundary_distances(lambda b: b @ w.T, torch.tensor([[3.0, 1.0]]))
        >>> round(float(out["min_distance"][0]), 6)  # (3 - 1) / ||(1, -1)|| = 2 / sqrt(2)
        1.414214
    """
    from torch.func import jacrev, vmap

    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"Expected `x` of shape (N, ...) with N >= 1, but got {tuple(x.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"Expected `chunk_size` to be None or a positive integer, but got {chunk_size!r}")

    def one(sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = fn(sample.unsqueeze(0)).squeeze(0)
        return logits, logits.detach()

    jac_fn = vmap(jacrev(one, has_aux=True), chunk_size=chunk_size)
    # torch.func transforms ignore an outer no_grad for their own derivatives; it only keeps the results out of
    # the autograd graph of the model's parameters.
    with torch.no_grad():
        jac, logits = jac_fn(x)  # (N, C, *shape), (N, C)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"Expected `fn` to return logits of shape (B, C) with C >= 2, but got "
                         f"{tuple(logits.shape)} per sample")
    jac = jac.reshape(jac.shape[0], jac.shape[1], -1).double()
    logits = logits.double()
    pred = logits.argmax(dim=1)
    rows = torch.arange(len(pred))
    margin = logits[rows, pred].unsqueeze(1) - logits
    grad_norm = torch.linalg.vector_norm(jac[rows, pred].unsqueeze(1) - jac, dim=2)
    distance = torch.where(grad_norm > 0, margin / grad_norm.clamp_min(torch.finfo(torch.float64).tiny),
                           torch.full_like(margin, float("inf")))
    distance[rows, pred] = float("inf")
    return {"logits": logits, "pred": pred, "margin": margin, "grad_norm": grad_norm, "distance": distance,
            "min_distance": distance.min(dim=1).values}


def linear_stability(min_distance: torch.Tensor, sigma: float) -> torch.Tensor:
    """``Phi(min_distance / sigma)``: the probability that Gaussian noise of standard deviation ``sigma`` keeps the
    prediction of a linear two-class model at that boundary distance (exact there; an approximation otherwise).

    Args:
        min_distance: ``(N,)`` nearest-competitor distances (``boundary_distances``'s ``min_distance``).
        sigma: Noise standard deviation, > 0.

    Returns:
        ``(N,)`` float64 probabilities in [0, 1] (1 for an infinite distance).

    Example:
        >>> float(linear_stability(torch.tensor([0.0]), sigma=1.0)[0])
        0.5
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"Expected `sigma` to be a positive number, but got {sigma!r}")
    return torch.special.ndtr(min_distance.double() / float(sigma))
