"""Calibration of finished runs: ECE, adaptive ECE, Brier, NLL, confidence, entropy, per-class ECE, reliability
diagrams and confidence distributions.

With data, every number is computed from the model's logits on the analysed samples (the maths of
`lightning_probes.functional.calibration`, which `ConfidenceMonitor` uses too). Without data, the latest record of
the run's ``ConfidenceMonitor`` (``probes/confidence.jsonl``: the test stage when present, else validation) gives
everything but the per-class ECE, which needs the predictions themselves.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch
from matplotlib.figure import Figure

from lightning_probes.callbacks.guard import data_records
from lightning_probes.functional import (
    calibration_error,
    calibration_sums,
    classwise_calibration_error,
    prediction_terms,
)
from lightning_probes.io import read_jsonl

__all__ = ["HIST_BINS", "calibration_figure", "calibration_from_logits", "calibration_from_probes",
           "confidence_figure"]

#: Equal-width bins of the reliability diagram and the ECE (ConfidenceMonitor's default).
N_BINS = 15
#: Bins of the confidence histograms.
HIST_BINS = 20


def calibration_from_logits(logits: torch.Tensor, target: torch.Tensor, n_bins: int = N_BINS) -> dict[str, Any]:
    """Every calibration number of one model's ``(N, C)`` logits against ``(N,)`` class indices.

    Returns:
        ``n``, ``accuracy``, ``ece`` (top-label, ``n_bins`` equal-width bins), ``adaptive_ece`` (``n_bins``
        equal-count bins), ``brier`` (multiclass, summed over classes, averaged over samples), ``nll``,
        ``mean_confidence``, ``mean_entropy`` (nats), ``per_class_ece`` (classwise ECE of each class) and
        ``classwise_ece`` (their mean), ``reliability`` (per bin ``count``, ``confidence_sum``, ``correct_sum``)
        and ``confidence_histogram`` (``HIST_BINS`` counts of the top-label confidence of the ``correct`` and the
        ``wrong`` predictions).
    """
    logits = logits.detach().double()
    target = target.long()
    probs = logits.softmax(dim=1)
    terms = prediction_terms(logits, target)
    confidence, correct = terms["confidence"].double(), terms["correct"].bool()
    sums = calibration_sums(confidence, correct, n_bins)
    per_class = classwise_calibration_error(probs, target, n_bins)
    edges = np.linspace(0, 1, HIST_BINS + 1)
    conf = confidence.numpy()
    right = correct.numpy()
    return {
        "n": int(len(target)),
        "accuracy": float(right.mean()) if len(right) else math.nan,
        "ece": float(calibration_error(probs, target, n_bins)),
        "adaptive_ece": float(calibration_error(probs, target, n_bins, adaptive=True)),
        "brier": float(terms["brier"].double().mean()),
        "nll": float(terms["nll"].double().mean()),
        "mean_confidence": float(confidence.mean()),
        "mean_entropy": float(terms["entropy"].double().mean()),
        "per_class_ece": per_class.tolist(),
        "classwise_ece": float(per_class.mean()),
        "reliability": {"count": sums[:, 0].tolist(), "confidence_sum": sums[:, 1].tolist(),
                        "correct_sum": sums[:, 2].tolist()},
        "confidence_histogram": {"edges": edges.tolist(),
                                 "correct": np.histogram(conf[right], edges)[0].tolist(),
                                 "wrong": np.histogram(conf[~right], edges)[0].tolist()},
    }


def calibration_from_probes(probes: Optional[str], name: str = "confidence") -> tuple[Optional[dict[str, Any]], str]:
    """The latest ``ConfidenceMonitor`` record of a run (test stage first, else validation; data loader 0).

    Returns:
        ``(results, note)``: the record's calibration numbers in the shape of `calibration_from_logits` (no
        per-class ECE; the confidence histogram with ConfidenceMonitor's own bins), or ``None`` and why.
    """
    path = os.path.join(probes, f"{name}.jsonl") if probes else None
    if path is None or not os.path.isfile(path):
        return None, f"no probes/{name}.jsonl (ConfidenceMonitor was not attached)"
    records = [r for r in data_records(read_jsonl(path)) if r.get("dataloader_idx", 0) == 0]
    for stage in ("test", "val"):
        staged = [r for r in records if r.get("stage") == stage]
        if staged:
            r = staged[-1]
            hist = r.get("confidence_histogram", {})
            bins = len(hist.get("correct", [])) or 1
            out = {key: r.get(key) for key in ("n", "accuracy", "ece", "adaptive_ece", "brier", "nll",
                                                "mean_confidence", "mean_entropy")}
            out.update({"reliability": r.get("reliability"), "per_class_ece": None, "classwise_ece": None,
                        "confidence_histogram": {"edges": np.linspace(0, 1, bins + 1).tolist(),
                                                 "correct": hist.get("correct", []), "wrong": hist.get("wrong", [])},
                        "source": f"probes/{name}.jsonl, {stage} epoch {r.get('epoch')}"})
            return out, out["source"]
    return None, f"probes/{name}.jsonl holds no val or test record"


def _reliability(result: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rel = result["reliability"]
    count = np.asarray(rel["count"], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.asarray(rel["confidence_sum"]) / count
        accuracy = np.asarray(rel["correct_sum"]) / count
    return count, confidence, accuracy


def calibration_figure(per_model: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Reliability diagrams (accuracy against confidence per bin; marker area by count), one panel per model."""
    n = len(per_model)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (name, result) in zip(axes, per_model.items()):
        count, confidence, accuracy = _reliability(result)
        filled = count > 0
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.scatter(confidence[filled], accuracy[filled], s=10 + 200 * count[filled] / count.sum(), alpha=0.7)
        ax.plot(confidence[filled], accuracy[filled], linewidth=1)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name}\nECE {result['ece']:.3f}  Brier {result['brier']:.3f}", fontsize=8)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle("Reliability diagrams (dashed: perfect calibration)")
    return fig


def confidence_figure(per_model: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Distributions of the top-label confidence of correct (solid) and wrong (dashed) predictions per model,
    each normalised to its own total."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for i, (name, result) in enumerate(per_model.items()):
        hist = result["confidence_histogram"]
        edges = np.asarray(hist["edges"])
        centres = (edges[:-1] + edges[1:]) / 2
        for ax, kind in zip(axes, ("correct", "wrong")):
            counts = np.asarray(hist[kind], dtype=float)
            if counts.size != centres.size or counts.sum() == 0:
                continue
            ax.plot(centres, counts / counts.sum(), color=f"C{i % 10}", label=name,
                    linestyle="-" if kind == "correct" else "--")
    for ax, kind in zip(axes, ("correct", "wrong")):
        ax.set_title(f"confidence of {kind} predictions", fontsize=10)
        ax.set_xlabel("top-label confidence")
        ax.set_ylabel("share of predictions")
    axes[0].legend(fontsize=7)
    fig.suptitle("Confidence distributions per model")
    return fig
