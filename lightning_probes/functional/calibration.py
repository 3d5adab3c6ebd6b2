"""Prediction quality: confusion with per-cell confidence, calibration error, Brier score, entropy.

Every function works on one batch; the ``*_sums`` helpers return additive sums so that a stream of batches can
be accumulated in constant memory and reduced across processes by summation. The ``*_index``,
`calibration_values` and `prediction_terms` helpers are the per-sample pieces of those sums: a streaming metric
(``ConfidenceState``) adds them into its own packed accumulators with one ``index_add_``, so the one-shot
functions here and the streaming state share one implementation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import torch

Norm = Literal["l1", "l2", "max"]


def _check_inputs(probs: torch.Tensor, target: torch.Tensor) -> None:
    if probs.ndim != 2:
        raise ValueError(f"Expected `probs` of shape (N, C), but got shape {tuple(probs.shape)}")
    if target.shape != probs.shape[:1]:
        raise ValueError(f"Expected `target` of shape ({probs.shape[0]},), but got shape {tuple(target.shape)}")


def flatten_class_dim(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Treat every position of ``(N, C, ...)`` predictions as a sample, as torchmetrics' multiclass metrics do.

    Args:
        logits: ``(N, C)`` or ``(N, C, d1, ...)`` scores (logits or probabilities).
        target: ``(N,)`` / ``(N, d1, ...)`` class indices, or a one-hot tensor of the shape of ``logits``.

    Returns:
        ``(M, C)`` scores and ``(M,)`` indices or ``(M, C)`` one-hot targets, ``M = N * d1 * ...``.

    Raises:
        ValueError: If the shapes do not fit together.
    """
    if logits.ndim < 2:
        raise ValueError(f"Expected `logits` of shape (N, C, ...), but got shape {tuple(logits.shape)}")
    index_shape = logits.shape[:1] + logits.shape[2:]
    if target.shape not in (index_shape, logits.shape):
        raise ValueError(f"Expected `target` of shape {tuple(index_shape)} (class indices) or {tuple(logits.shape)} "
                         f"(one-hot), but got shape {tuple(target.shape)}")
    num_classes, one_hot = logits.shape[1], target.shape == logits.shape
    if logits.ndim > 2:
        logits = logits.movedim(1, -1).reshape(-1, num_classes)  # (N * d1 * ..., C)
        target = target.movedim(1, -1).reshape(-1, num_classes) if one_hot else target.reshape(-1)
    return logits, target


def one_hot_to_index(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class indices of ``(N, C)`` one-hot targets, and which rows are exactly one-hot.

    Returns:
        ``index`` ``(N,)`` int64 (the argmax of each row) and ``is_one_hot`` ``(N,)`` bool: ``False`` for rows
        that are soft labels (values other than 0 and 1, or not exactly one 1).
    """
    if target.ndim != 2:
        raise ValueError(f"Expected one-hot `target` of shape (N, C), but got shape {tuple(target.shape)}")
    if target.dtype == torch.bool:
        target = target.to(torch.uint8)
    is_one_hot = ((target == 0) | (target == 1)).all(dim=1) & (target.sum(dim=1) == 1)
    return target.argmax(dim=1), is_one_hot


def confusion_index(target: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Flat index ``target * C + predicted`` of each sample's confusion cell (rows: true, columns: predicted)."""
    return target.long() * num_classes + predicted.long()


def threshold_level(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """How many of the (ascending) ``thresholds`` each confidence reaches (``threshold <= confidence``)."""
    return torch.bucketize(confidence, thresholds.to(confidence), right=True)


def prediction_terms(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample top-label terms of ``(N, C)`` logits against ``(N,)`` class indices, in one pass.

    Returns:
        ``(N,)`` float32 tensors: ``confidence`` (top-label probability), ``predicted`` (int64), ``correct``
        (0/1), ``brier`` (``sum_c (p_c - [c == y])^2``), ``nll`` (``-log p_y``) and ``entropy`` (nats, ``0 log 0
        = 0``, so logits of ``-inf`` are fine).
    """
    log_probs = logits.detach().float().log_softmax(dim=1)  # (N, C)
    probs = log_probs.exp()
    confidence, predicted = probs.max(dim=1)
    target = target.long().unsqueeze(1)  # (N, 1)
    picked = probs.gather(1, target).squeeze(1)
    return {
        "confidence": confidence,
        "predicted": predicted,
        "correct": (predicted == target.squeeze(1)).to(probs.dtype),
        "brier": probs.square().sum(dim=1) - 2 * picked + 1,
        "nll": -log_probs.gather(1, target).squeeze(1),
        "entropy": -torch.where(probs > 0, probs * log_probs, 0.0).sum(dim=1),
    }


def confusion_confidence(probs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confusion counts and the sum of top-label confidences per cell (rows: true class, columns: predicted).

    Args:
        probs: ``(N, C)`` class probabilities.
        target: ``(N,)`` true classes.

    Returns:
        ``counts`` ``(C, C)`` int64 and ``confidence_sums`` ``(C, C)`` float64; the mean confidence of a cell is
        ``confidence_sums / counts``.
    """
    _check_inputs(probs, target)
    num_classes = probs.shape[1]
    confidence, predicted = probs.max(dim=1)
    cell = confusion_index(target, predicted, num_classes)  # (N,)
    cells = num_classes**2
    counts = torch.zeros(cells, dtype=torch.int64, device=cell.device).index_add_(0, cell, torch.ones_like(cell))
    sums = torch.zeros(cells, dtype=torch.float64, device=probs.device).index_add_(0, cell, confidence.double())
    return counts.view(num_classes, num_classes), sums.view(num_classes, num_classes)


@functools.lru_cache(maxsize=64)
def _bin_boundaries(n_bins: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.linspace(0, 1, n_bins + 1, dtype=dtype, device=device)


def calibration_bin_index(confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-width bin of each confidence: bin ``k`` holds ``k/n <= c < (k+1)/n``; ``c == 1`` gets bin ``n``.

    This is torchmetrics' binning (``bucketize(..., right=True) - 1`` over ``linspace(0, 1, n + 1)``), so there
    are ``n_bins + 1`` bins, the last holding only confidences of exactly 1.
    """
    boundaries = _bin_boundaries(n_bins, confidence.dtype, confidence.device)  # cached: called per batch
    return torch.bucketize(confidence, boundaries, right=True) - 1


def calibration_values(confidence: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per-sample rows ``[1, confidence, correct]`` (``(N, 3)`` float64): summed per bin, they give the bin's
    count, confidence sum and correct sum."""
    return torch.stack([torch.ones_like(confidence), confidence, correct.to(confidence.dtype)], dim=1).double()


def calibration_sums(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Per-bin ``[count, sum of confidence, sum of correct]`` (``(n_bins + 1, 3)`` float64), additive over batches."""
    index = calibration_bin_index(confidence, n_bins)
    values = calibration_values(confidence, correct)
    return torch.zeros(n_bins + 1, 3, dtype=torch.float64, device=confidence.device).index_add_(0, index, values)


def calibration_error_from_sums(sums: torch.Tensor, norm: Norm = "l1") -> torch.Tensor:
    """Calibration error from per-bin ``[count, confidence sum, correct sum]`` rows (empty bins ignored).

    ``l1`` is the expected calibration error (ECE), ``max`` the maximum calibration error (MCE), ``l2`` the
    root of the count-weighted mean squared gap.
    """
    if norm not in ("l1", "l2", "max"):
        raise ValueError(f"Expected `norm` to be one of ('l1', 'l2', 'max'), but got {norm!r}")
    count = sums[:, 0]
    filled = count > 0
    gap = (sums[filled, 2] - sums[filled, 1]).abs() / count[filled]
    weight = count[filled] / count.sum().clamp_min(1)
    if gap.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=sums.device)
    if norm == "l1":
        return (gap * weight).sum()
    if norm == "max":
        return gap.max()
    return (gap.square() * weight).sum().sqrt()


def adaptive_bins_from_histogram(fine: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Merge a fine equal-width histogram ``(R, 3)`` into ``n_bins`` groups of (nearly) equal count.

    Each fine bin goes to group ``floor(n_bins * (cumulative count before its middle) / total)``, so the groups
    hold about ``total / n_bins`` samples each; the result is exact when every group boundary falls between two
    fine bins (equal-count binning of a stream in constant memory).
    """
    count = fine[:, 0]
    total = count.sum()
    if total <= 0:
        return torch.zeros(n_bins, 3, dtype=fine.dtype, device=fine.device)
    middle = count.cumsum(0) - count / 2
    group = (middle * n_bins / total).floor().clamp(0, n_bins - 1).long()
    return torch.zeros(n_bins, 3, dtype=fine.dtype, device=fine.device).index_add_(0, group, fine)


def calibration_error(
    probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int = 15,
    norm: Norm = "l1",
    adaptive: bool = False,
) -> torch.Tensor:
    """Top-label calibration error of one batch of predictions.

    Args:
        probs: ``(N, C)`` class probabilities.
        target: ``(N,)`` true classes.
        n_bins: Number of bins.
        norm: ``"l1"`` (ECE), ``"l2"`` or ``"max"`` (MCE).
        adaptive: Equal-count bins (sorted confidences split into ``n_bins`` nearly equal groups) instead of
            equal-width bins.

    Returns:
        A 0-dim float64 tensor.
    """
    _check_inputs(probs, target)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"Expected `n_bins` to be a positive integer, but got {n_bins!r}")
    confidence, predicted = probs.max(dim=1)
    correct = predicted == target
    if not adaptive:
        return calibration_error_from_sums(calibration_sums(confidence, correct, n_bins), norm)
    order = confidence.argsort()
    group = torch.arange(len(order), device=probs.device) * n_bins // max(1, len(order))
    values = calibration_values(confidence, correct)
    sums = torch.zeros(n_bins, 3, dtype=torch.float64, device=probs.device).index_add_(0, group, values[order])
    return calibration_error_from_sums(sums, norm)


def brier_score(probs: torch.Tensor, target: torch.Tensor, reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Multiclass Brier score: ``sum_c (p_c - [c == y])^2`` per sample, averaged (or summed)."""
    _check_inputs(probs, target)
    one_hot = torch.nn.functional.one_hot(target.long(), probs.shape[1]).to(probs.dtype)
    per_sample = (probs - one_hot).square().sum(dim=1).double()
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_c p_c log p_c`` (nats) of each row of ``(N, C)`` probabilities, with ``0 log 0 = 0``."""
    return -(probs * torch.log(probs.clamp_min(1e-45))).where(probs > 0, torch.zeros_like(probs)).sum(dim=1)


def normalized_entropy(distribution: torch.Tensor) -> torch.Tensor:
    """Entropy of a distribution (counts or probabilities) divided by ``log(C)``: 1 uniform, 0 one class."""
    p = distribution.double() / distribution.double().sum().clamp_min(1e-300)
    return predictive_entropy(p.unsqueeze(0))[0] / torch.log(torch.tensor(float(len(p)), dtype=torch.float64))


def thresholded_confusion(probs: torch.Tensor, target: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Confusion counts ``(T, C, C)`` restricted to predictions with confidence ``>=`` each threshold."""
    _check_inputs(probs, target)
    num_classes = probs.shape[1]
    confidence, predicted = probs.max(dim=1)
    cell = confusion_index(target, predicted, num_classes)
    out = torch.zeros(len(thresholds), num_classes**2, dtype=torch.int64, device=probs.device)
    for i, threshold in enumerate(thresholds):
        keep = confidence >= threshold
        out[i].index_add_(0, cell, keep.long())
    return out.view(len(thresholds), num_classes, num_classes)


def classification_scores(confusion: torch.Tensor) -> dict[str, Any]:
    """Accuracy and per-class / macro precision, recall and F1 from a confusion matrix (rows: true).

    Undefined ratios count as 0, and the macro average leaves out classes that appear neither as target nor as
    prediction, as torchmetrics does (the tests check agreement with torchmetrics).

    Returns:
        ``accuracy``, ``macro_precision``, ``macro_recall``, ``macro_f1`` as floats; ``precision``, ``recall``,
        ``f1`` as ``(C,)`` float64 tensors.
    """
    cm = confusion.double()
    return classification_scores_from_counts(cm.diagonal(), cm.sum(dim=0), cm.sum(dim=1))


def classification_scores_from_counts(tp: torch.Tensor, predicted: torch.Tensor,
                                      actual: torch.Tensor) -> dict[str, Any]:
    """`classification_scores` from the three per-class counts that are all it reads of a confusion matrix.

    Args:
        tp: ``(C,)`` correct predictions per class (the diagonal).
        predicted: ``(C,)`` predictions per class (the column sums).
        actual: ``(C,)`` samples per true class (the row sums).

    Returns:
        As `classification_scores`.
    """
    tp, predicted, actual = tp.double(), predicted.double(), actual.double()
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp_min(1), torch.zeros_like(tp))
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp_min(1e-300), torch.zeros_like(tp))
    present = (predicted + actual) > 0
    weight = present.double() / present.sum().clamp_min(1)
    return {"accuracy": float(tp.sum() / actual.sum().clamp_min(1)),
            "macro_precision": float((precision * weight).sum()), "macro_recall": float((recall * weight).sum()),
            "macro_f1": float((f1 * weight).sum()), "precision": precision, "recall": recall, "f1": f1}


def classwise_calibration_error(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Per-class calibration error (Kull et al. 2019's classwise ECE, one value per class).

    For class ``c``, the probabilities ``p_c`` of every sample are put in ``n_bins`` equal-width bins (the binning of
    `calibration_bin_index`) and compared with how often the sample's class is ``c``:
    ``ECE_c = sum_b (n_b / N) |mean(p_c in b) - mean([y == c] in b)|``. The classwise ECE is their mean.

    Args:
        probs: ``(N, C)`` class probabilities.
        target: ``(N,)`` true classes.
        n_bins: Number of equal-width bins.

    Returns:
        ``(C,)`` float64 tensor.
    """
    _check_inputs(probs, target)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"Expected `n_bins` to be a positive integer, but got {n_bins!r}")
    one_hot = torch.nn.functional.one_hot(target.long(), probs.shape[1])
    return torch.stack([
        calibration_error_from_sums(calibration_sums(probs[:, c].contiguous(), one_hot[:, c], n_bins), "l1")
        for c in range(probs.shape[1])])


def merge_pairs(rows: torch.Tensor) -> torch.Tensor:
    """Sum the rows of a sparse confusion that share a cell: ``(M, 1 + V)`` rows ``[cell, values...]`` (float64,
    the cell a flat index ``target * C + predicted`` held exactly: below 2**53) to one row per cell, sorted by cell.

    Example:
        >>> merge_pairs(torch.tensor([[5., 1., 0.5], [2., 1., 0.9], [5., 1., 0.7]], dtype=torch.float64)).tolist()
        [[2.0, 1.0, 0.9], [5.0, 2.0, 1.2]]
    """
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise ValueError(f"Expected `rows` of shape (M, 1 + values), but got shape {tuple(rows.shape)}")
    if rows.shape[0] == 0:
        return rows
    cells, where = torch.unique(rows[:, 0], sorted=True, return_inverse=True)
    values = torch.zeros(len(cells), rows.shape[1] - 1, dtype=rows.dtype, device=rows.device)
    values.index_add_(0, where, rows[:, 1:])
    return torch.cat([cells.unsqueeze(1), values], dim=1)


def top_confusions(pairs: torch.Tensor, num_classes: int, k: int) -> dict[str, Any]:
    """The ``k`` most frequent off-diagonal cells of a sparse confusion, and what the others hold.

    Args:
        pairs: ``(M, 3)`` merged rows ``[cell, count, sum of confidence]`` (`merge_pairs`), ``cell = target * C +
            predicted``.
        num_classes: ``C``.
        k: Most cells listed.

    Returns:
        ``true``, ``predicted``, ``count`` (ints) and ``mean_confidence`` (floats): lists of the listed cells, by
        count descending, ties by cell (row-major) ascending; ``cells``: off-diagonal cells with a prediction;
        ``other_count``: predictions in the off-diagonal cells not listed. A dense ``(C, C)`` matrix ``m`` gives
        the same cells as its off-diagonal entries sorted by ``(-m[t, p], t * C + p)``.
    """
    cell = pairs[:, 0].long()
    counts = pairs[:, 1]
    off = (cell // num_classes != cell % num_classes) & (counts > 0)
    cell, counts, sums = cell[off], counts[off], pairs[off, 2]
    # Ascending cell order is kept by a stable sort on the count: ties stay in row-major order.
    order = torch.sort(-counts, stable=True).indices[:k]
    listed = counts[order]
    return {"true": (cell[order] // num_classes).tolist(), "predicted": (cell[order] % num_classes).tolist(),
            "count": listed.round().long().tolist(), "mean_confidence": (sums[order] / listed).tolist(),
            "cells": int(len(cell)), "other_count": int(round(float(counts.sum() - listed.sum())))}
