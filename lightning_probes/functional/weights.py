"""Statistics of one weight tensor (a ``Linear`` or ``Conv`` weight) and a per-layer health score.

A weight of ``ndim >= 2`` is read as a matrix ``(out_features, fan_in)``: a ``Conv2d`` weight
``(out, in / groups, kh, kw)`` becomes ``(out, in / groups * kh * kw)``, the matrix the convolution applies to each
input patch, so its spectral norm and stable rank are those of that matrix.

Example:
    >>> import torch
    >>> stats = weight_statistics(torch.eye(3))
    >>> round(stats["spectral_norm"], 6), round(stats["stable_rank"], 6), round(stats["sparsity"], 6)
    (1.0, 3.0, 0.666667)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import stats as sps

__all__ = ["HEALTH_FORMULA", "SPARSITY_TOLERANCE", "WEIGHT_STATISTICS", "health_score", "spectral_norm",
           "weight_matrix", "weight_statistics"]

#: ``|w|`` below this counts as zero in ``sparsity``.
SPARSITY_TOLERANCE = 1e-6

#: The keys of `weight_statistics`, in the order of tables and feature vectors.
WEIGHT_STATISTICS = ("l1", "l2", "spectral_norm", "stable_rank", "mean", "std", "skewness", "kurtosis", "sparsity")

#: The health score's definition, written into ``analysis_results.json`` beside the scores.
HEALTH_FORMULA = (
    "health = 100 * density * scale * tails (0 when any weight is NaN or infinite), each factor in [0, 1]: "
    "density = 1 - sparsity (share of |w| >= 1e-6); "
    "scale = exp(-|log10(std * sqrt(fan_in))|), 1 when the weights have the 1/sqrt(fan_in) scale that keeps a "
    "layer's output variance near its input's, 1/e when they are 10x too small (vanishing) or too large "
    "(exploding); tails = 1 / (1 + max(0, excess kurtosis) / 10), 1 for Gaussian- or uniform-like weights, 1/2 at "
    "an excess kurtosis of 10 (a few outlier weights dominate)")


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a float64 matrix ``(out_features, fan_in)`` (a vector becomes one row).

    Raises:
        ValueError: For a 0-dim tensor.
    """
    if weight.ndim == 0:
        raise ValueError(f"Expected `weight` to have at least one dimension, but got shape {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float64)
    return w.reshape(1, -1) if w.ndim == 1 else w.reshape(w.shape[0], -1)


def spectral_norm(matrix: torch.Tensor) -> float:
    """Largest singular value of a 2-D tensor, as the root of the largest eigenvalue of its smaller Gram matrix
    (``W W^T`` or ``W^T W``, float64): one symmetric eigen-solve of ``min(rows, cols)`` instead of a full SVD."""
    m = matrix.to(torch.float64)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())


def weight_statistics(weight: torch.Tensor) -> dict[str, Any]:
    """Norms, spectrum and distribution of one weight tensor.

    Returns:
        ``shape``, ``numel``, ``fan_in`` and, as floats: ``l1`` (sum of ``|w|``), ``l2`` (Frobenius norm),
        ``spectral_norm`` (largest singular value of `weight_matrix`), ``stable_rank`` (``l2^2 /
        spectral_norm^2``, between 1 and the rank; NaN for an all-zero weight), ``mean``, ``std`` (population,
        ``ddof=0``), ``skewness`` and ``kurtosis`` (``scipy.stats.skew`` and ``scipy.stats.kurtosis``: Fisher's
        excess kurtosis, 0 for a Gaussian; biased estimators; NaN for constant weights), ``sparsity`` (share of
        ``|w| < 1e-6``), ``finite`` (every weight finite). With non-finite weights the other statistics are NaN.
    """
    matrix = weight_matrix(weight)
    flat = matrix.reshape(-1)
    finite = bool(torch.isfinite(flat).all())
    out: dict[str, Any] = {"shape": list(weight.shape), "numel": int(flat.numel()), "fan_in": int(matrix.shape[1]),
                           "finite": finite}
    if not finite:
        return {**out, **{key: math.nan for key in WEIGHT_STATISTICS}}
    values = flat.numpy()
    l2 = float(torch.linalg.vector_norm(flat))
    spectral = spectral_norm(matrix)
    constant = bool(values.size < 2 or np.all(values == values[0]))
    out.update({
        "l1": float(flat.abs().sum()),
        "l2": l2,
        "spectral_norm": spectral,
        "stable_rank": l2 ** 2 / spectral ** 2 if spectral > 0 else math.nan,
        "mean": float(values.mean()),
        "std": float(values.std()),
        "skewness": math.nan if constant else float(sps.skew(values)),
        "kurtosis": math.nan if constant else float(sps.kurtosis(values)),
        "sparsity": float((flat.abs() < SPARSITY_TOLERANCE).double().mean()),
    })
    return out


def health_score(stats: dict[str, Any]) -> dict[str, float]:
    """The health score of one layer from its `weight_statistics` (see `HEALTH_FORMULA`).

    Returns:
        ``health`` (0 to 100) and its factors ``density``, ``scale`` and ``tails``. A NaN kurtosis (constant
        weights) counts as no heavy tails; an all-zero layer has density 0 and health 0.

    Example:
        >>> health_score({"finite": True, "sparsity": 0.0, "std": 0.1, "fan_in": 100, "kurtosis": 0.0})["health"]
        100.0
    """
    if not stats.get("finite", True):
        return {"health": 0.0, "density": 0.0, "scale": 0.0, "tails": 0.0}
    density = 1.0 - float(stats["sparsity"])
    spread = float(stats["std"]) * math.sqrt(float(stats["fan_in"]))
    scale = math.exp(-abs(math.log10(spread))) if spread > 0 else 0.0
    kurtosis = float(stats["kurtosis"])
    tails = 1.0 / (1.0 + max(0.0, 0.0 if math.isnan(kurtosis) else kurtosis) / 10.0)
    return {"health": 100.0 * density * scale * tails, "density": density, "scale": scale, "tails": tails}
