"""`ConfidenceMonitor`'s record and figures: the summed state (`ConfidenceState`) as one record (`summarize`),
the figures drawn from a record, and the console table of the test results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from lightning_probes.callbacks.base import FigureSpec
from lightning_probes.callbacks.confidence_state import HIST_BINS
from lightning_probes.functional.calibration import (
    adaptive_bins_from_histogram,
    calibration_error_from_sums,
    classification_scores_from_counts,
    normalized_entropy,
    top_confusions,
)
from lightning_probes.plotting import heatmap

__all__ = ["TOP_CONFUSIONS", "calibration_figure", "confusion_figure", "format_table", "stage_figures", "summarize",
           "thresholds_figure", "top_confusions_figure"]

#: Classes up to which the figures label every class (and draw the class distributions as bars).
MAX_LABELLED = 50


def stage_figures(results: Mapping[str, Any], stage: str, suffix: str, epoch: int, min_count: int) -> list[FigureSpec]:
    """The three figures of one stage's results: ``[(filename, tag, draw), ...]``.

    Args:
        results: One record (`summarize`'s output, as in the JSONL).
        stage: ``val`` or ``test``.
        suffix: ``/dataloader_idx_<i>`` with several data loaders, else ``""``.
        epoch: Epoch label of the titles.
        min_count: Cells with fewer predictions are masked in the confidence heatmap.
    """
    label, file_prefix = f"{stage}{suffix}", f"{stage}{suffix.replace('/', '_')}"
    calibration = (f"{file_prefix}_calibration.png", f"{stage}/calibration{suffix}",
                   lambda: calibration_figure(results, f"{label}, epoch {epoch}"))
    if "confusion_matrix" not in results:  # a sparse record: the most frequent confusions instead of the matrices
        return [(f"{file_prefix}_top_confusions.png", f"{stage}/top_confusions{suffix}",
                 lambda: top_confusions_figure(results, label, epoch)), calibration]
    return [(f"{file_prefix}_confusion.png", f"{stage}/confusion{suffix}",
             lambda: confusion_figure(results, label, epoch, min_count)),
            (f"{file_prefix}_confusion_thresholds.png", f"{stage}/confusion_thresholds{suffix}",
             lambda: thresholds_figure(results)), calibration]


def top_confusions_figure(results: Mapping[str, Any], label: str, epoch: int, shown: int = 30) -> Figure:
    """The ``shown`` most frequent off-diagonal cells of ``top_confusions``: counts and mean confidence."""
    top = results["top_confusions"]
    count = top["count"][:shown]
    fig = Figure(figsize=(8, 1.5 + 0.25 * max(1, len(count))), layout="constrained")
    ax = fig.subplots()
    names = [f"{t} -> {p}" for t, p in zip(top["true"][:shown], top["predicted"][:shown])]
    bars = ax.barh(range(len(count)), count, color="tab:red")
    for bar, conf in zip(bars, top["mean_confidence"][:shown]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {conf:.2f}", va="center", fontsize=6)
    ax.set_yticks(range(len(count)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="predictions (label: mean confidence)", title=f"{label} most frequent confusions (true -> "
           f"predicted), epoch {epoch}: {top['cells']} cells, {top['other_count']} predictions in cells not shown "
           f"in the record"[:200])
    return fig


def confusion_figure(results: Mapping[str, Any], label: str, epoch: int, min_count: int) -> Figure:
    """Counts, row-normalised confusion and mean confidence per cell (cells with < ``min_count`` masked)."""
    counts = np.asarray(results["confusion_matrix"], dtype=float)
    confidence = np.asarray(results["confidence_matrix"], dtype=float)
    confidence[counts < min_count] = np.nan
    with np.errstate(invalid="ignore"):
        normalised = counts / counts.sum(axis=1, keepdims=True)
    fig = Figure(figsize=(17, 5))
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.1, top=0.86, wspace=0.25)
    axes = fig.subplots(1, 3)
    labels = [str(i) for i in range(len(counts))] if len(counts) <= MAX_LABELLED else None
    heatmap(counts, "counts (rows: true, cols: predicted)", labels, labels, annotate=True, ax=axes[0])
    heatmap(normalised, "row-normalised", labels, labels, vmin=0, vmax=1, ax=axes[1])
    heatmap(confidence, f"mean confidence (cells with < {min_count} masked)", labels, labels, 0, 1,
            cmap="magma", annotate=True, ax=axes[2])
    fig.suptitle(f"{label} confusion, epoch {epoch}")
    return fig


def thresholds_figure(results: Mapping[str, Any]) -> Figure:
    """The confusion matrices restricted to predictions whose confidence reaches each threshold."""
    thresholded = results["thresholded"]
    classes = len(results["confusion_matrix"])
    labels = [str(i) for i in range(classes)] if classes <= MAX_LABELLED else None
    fig = Figure(figsize=(5.5 * max(1, len(thresholded)), 5))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.1, top=0.9, wspace=0.25)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(thresholded))))
    for ax, (t, entry) in zip(axes, thresholded.items()):
        heatmap(np.asarray(entry["confusion_matrix"]), f"confidence >= {t}: coverage {entry['coverage']:.1%}",
                labels, labels, ax=ax)
    return fig


#: Off-diagonal confusion cells listed in a record's ``top_confusions``.
TOP_CONFUSIONS = 100


def summarize(state: Mapping[str, torch.Tensor], thresholds: Sequence[float],
              top_k: int = TOP_CONFUSIONS) -> dict[str, Any]:
    """Turn the reduced sums into the JSON-friendly record of one epoch.

    A dense state (``confusion``, ``confidence_sums``, ``thresholded``) gives the full matrices; a sparse one
    (``classes``, ``levels``, ``pairs``: `ConfidenceState` with ``sparse=True``) gives every other field with the
    same values and ``confusion_format: "sparse"`` instead of ``confusion_matrix``, ``confidence_matrix`` and the
    thresholded matrices. Both list the ``top_k`` most frequent off-diagonal cells in ``top_confusions``.
    """
    sparse = "pairs" in state
    if sparse:
        true, predicted, correct = state["classes"]
        levels = state["levels"]  # (T + 1, 2): [count, correct] per number of thresholds reached
        pairs = state["pairs"]
    else:
        confusion = state["confusion"].double()
        true, predicted, correct = confusion.sum(dim=1), confusion.sum(dim=0), confusion.diagonal()
        cell = torch.arange(confusion.numel())
        pairs = torch.stack([cell.double(), confusion.flatten(), state["confidence_sums"].flatten()], dim=1)
        pairs = pairs[pairs[:, 1] > 0]
    scores = classification_scores_from_counts(correct, predicted, true)
    n = float(true.sum())
    brier, nll, entropy, conf = (float(v) / max(n, 1.0) for v in state["scalars"])
    calibration = state["calibration"]
    adaptive = adaptive_bins_from_histogram(state["fine"], calibration.shape[0] - 1)
    out: dict[str, Any] = {
        "n": int(n),
        "accuracy": scores["accuracy"],
        "macro_precision": scores["macro_precision"],
        "macro_recall": scores["macro_recall"],
        "macro_f1": scores["macro_f1"],
        "ece": float(calibration_error_from_sums(calibration, "l1")),
        "adaptive_ece": float(calibration_error_from_sums(adaptive, "l1")),
        "mce": float(calibration_error_from_sums(calibration, "max")),
        "brier": brier,
        "nll": nll,
        "mean_confidence": conf,
        "mean_entropy": entropy,
        "prediction_entropy_normalized": float(normalized_entropy(predicted)),
        "top_class_share": float(predicted.max() / max(n, 1.0)),
        "predicted_distribution": (predicted / max(n, 1.0)).tolist(),
        "true_distribution": (true / max(n, 1.0)).tolist(),
        "per_class_precision": scores["precision"].tolist(),
        "per_class_recall": scores["recall"].tolist(),
        "per_class_f1": scores["f1"].tolist(),
        "confusion_format": "sparse" if sparse else "dense",
        "top_confusions": top_confusions(pairs, len(true), top_k),
    }
    if not sparse:
        with np.errstate(invalid="ignore", divide="ignore"):
            out["confidence_matrix"] = (state["confidence_sums"] / confusion).numpy().tolist()
        out["confusion_matrix"] = state["confusion"].tolist()
    out.update({
        "reliability": {"count": calibration[:, 0].tolist(), "confidence_sum": calibration[:, 1].tolist(),
                        "correct_sum": calibration[:, 2].tolist()},
        "confidence_histogram": {"correct": state["hist_correct"][:, 0].tolist(),
                                 "wrong": state["hist_wrong"][:, 0].tolist()},
        "thresholded": {},
    })
    for j, t in enumerate(thresholds):
        if sparse:  # predictions reaching threshold j: those with at least j + 1 thresholds reached
            kept, right, matrix = float(levels[j + 1:, 0].sum()), float(levels[j + 1:, 1].sum()), None
        else:
            matrix = state["thresholded"][j]
            kept, right = float(matrix.sum()), float(matrix.diagonal().sum())
        entry = {"coverage": kept / max(n, 1.0), "accuracy": right / kept if kept else None}
        if matrix is not None:
            entry["confusion_matrix"] = matrix.tolist()
        out["thresholded"][str(t)] = entry
    return out


def calibration_figure(results: Mapping[str, Any], title: str) -> Figure:
    """Reliability diagram, confidence histograms of correct vs wrong, predicted vs true class distribution."""
    fig = Figure(figsize=(16, 4.5))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.12, top=0.85, wspace=0.25)
    ax_rel, ax_hist, ax_dist = fig.subplots(1, 3)
    rel = {k: np.asarray(v, dtype=float) for k, v in results["reliability"].items()}
    n_bins = len(rel["count"]) - 1
    edges = np.linspace(0, 1, n_bins + 1)
    filled = rel["count"][:n_bins] > 0
    accuracy = np.divide(rel["correct_sum"][:n_bins], rel["count"][:n_bins], out=np.zeros(n_bins), where=filled)
    ax_rel.bar(edges[:-1], accuracy, width=1 / n_bins, align="edge", edgecolor="k", label="accuracy")
    ax_rel.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax_rel.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
               title=f"reliability: ECE {results['ece']:.3f}, MCE {results['mce']:.3f}")
    ax_rel.legend(fontsize=7)
    h_edges = np.linspace(0, 1, HIST_BINS + 1)
    for name, color in (("correct", "tab:green"), ("wrong", "tab:red")):
        counts = np.asarray(results["confidence_histogram"][name], dtype=float)
        counts = np.append(counts[:-2], counts[-2] + counts[-1])  # fold confidence == 1 into the last bin
        ax_hist.stairs(counts, h_edges, label=name, color=color, fill=True, alpha=0.5)
    ax_hist.set(xlabel="confidence", ylabel="predictions", title="confidence of correct vs wrong")
    ax_hist.legend(fontsize=7)
    classes = np.arange(len(results["true_distribution"]))
    if len(classes) <= MAX_LABELLED:
        ax_dist.bar(classes - 0.2, results["true_distribution"], 0.4, label="true")
        ax_dist.bar(classes + 0.2, results["predicted_distribution"], 0.4, label="predicted")
    else:  # thousands of bars are slow to draw: the distributions as lines
        ax_dist.plot(classes, results["true_distribution"], lw=0.6, label="true")
        ax_dist.plot(classes, results["predicted_distribution"], lw=0.6, label="predicted")
    ax_dist.set(xlabel="class", ylabel="share",
                title=f"class distribution: normalised entropy {results['prediction_entropy_normalized']:.2f}")
    ax_dist.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def format_table(results: Mapping[str, Any], title: str = "ConfidenceMonitor (test)") -> str:
    """Plain-text table of the headline numbers."""
    rows = [("samples", f"{results['n']}"), ("accuracy", f"{results['accuracy']:.4f}"),
            ("macro F1", f"{results['macro_f1']:.4f}"), ("ECE", f"{results['ece']:.4f}"),
            ("adaptive ECE", f"{results['adaptive_ece']:.4f}"), ("MCE", f"{results['mce']:.4f}"),
            ("Brier", f"{results['brier']:.4f}"), ("NLL", f"{results['nll']:.4f}"),
            ("mean confidence", f"{results['mean_confidence']:.4f}"),
            ("mean entropy", f"{results['mean_entropy']:.4f}"),
            ("prediction entropy", f"{results['prediction_entropy_normalized']:.4f}"),
            ("top class share", f"{results['top_class_share']:.4f}")]
    for t, entry in results["thresholded"].items():
        acc = "n/a" if entry["accuracy"] is None else f"{entry['accuracy']:.4f}"
        rows.append((f"conf >= {t}", f"coverage {entry['coverage']:.3f}, accuracy {acc}"))
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * (width + 40)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
