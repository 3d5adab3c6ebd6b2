"""`ConfidenceMonitor`: confusion with per-cell confidence, calibration and collapse, per validation/test epoch."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import Metric

from lightning_probes.callbacks.base import ProbeCallback, check_fraction, check_positive_int
from lightning_probes.functional.calibration import (
    adaptive_bins_from_histogram,
    calibration_bin_index,
    calibration_error_from_sums,
    normalized_entropy,
)
from lightning_probes.plotting import heatmap

log = logging.getLogger(__name__)

_HIST_BINS = 20


class ConfidenceState(Metric):
    """Constant-memory running sums behind `ConfidenceMonitor`, summed across processes by torchmetrics.

    Each batch costs two ``index_add_`` calls into packed float64 accumulators (speed matters: a validation
    batch of a small model takes milliseconds):

    - ``cells``: per (true class, predicted class, number of ``thresholds`` the confidence reaches):
      ``[count, sum of confidence]``;
    - ``bins``: per calibration bin (``n_bins + 1``, torchmetrics' binning), fine bin
      (``adaptive_resolution + 1``) and histogram bin of correct and of wrong predictions (``21`` each):
      ``[count, sum of confidence, sum of correct]``;
    - ``scalars``: sums of Brier score, NLL, predictive entropy and confidence.

    Args:
        num_classes: Number of classes.
        n_bins: Equal-width calibration bins.
        thresholds: Confidence thresholds of the restricted confusion matrices.
        adaptive_resolution: Fine equal-width bins from which the equal-count (adaptive) bins are formed.
    """

    full_state_update = False

    def __init__(self, num_classes: int, n_bins: int, thresholds: Sequence[float], adaptive_resolution: int) -> None:
        super().__init__()
        self.num_classes, self.n_bins, self.thresholds = num_classes, n_bins, tuple(thresholds)
        self.adaptive_resolution = adaptive_resolution
        levels = len(self.thresholds) + 1
        self._offsets = (0, n_bins + 1, n_bins + 1 + adaptive_resolution + 1,
                         n_bins + 1 + adaptive_resolution + 1 + 2 * (_HIST_BINS + 1))
        self.add_state("cells", torch.zeros(num_classes * num_classes * levels, 2, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("bins", torch.zeros(self._offsets[-1], 3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("scalars", torch.zeros(4, dtype=torch.float64), dist_reduce_fx="sum")  # brier, nll, H, conf
        self.register_buffer("_threshold_values", torch.tensor(self.thresholds, dtype=torch.float32), persistent=False)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        log_probs = logits.detach().float().log_softmax(dim=1)  # (N, C)
        probs = log_probs.exp()
        confidence, predicted = probs.max(dim=1)
        target = target.long()
        correct = (predicted == target).to(probs.dtype)
        levels = len(self.thresholds) + 1
        reached = torch.bucketize(confidence, self._threshold_values, right=True)  # thresholds <= confidence
        cell = (target * self.num_classes + predicted) * levels + reached
        self.cells.index_add_(0, cell, torch.stack([torch.ones_like(confidence), confidence], dim=1).double())
        main = calibration_bin_index(confidence, self.n_bins)
        fine = (confidence * self.adaptive_resolution).long().clamp_(0, self.adaptive_resolution)
        hist = (confidence * _HIST_BINS).long().clamp_(0, _HIST_BINS) + (1 - correct.long()) * (_HIST_BINS + 1)
        index = torch.cat([main, fine + self._offsets[1], hist + self._offsets[2]])
        values = torch.stack([torch.ones_like(confidence), confidence, correct], dim=1).double()
        self.bins.index_add_(0, index, values.repeat(3, 1))
        picked = probs.gather(1, target.unsqueeze(1)).squeeze(1)
        brier = probs.square().sum(dim=1) - 2 * picked + 1
        nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
        entropy = -torch.where(probs > 0, probs * log_probs, 0.0).sum(dim=1)  # 0 log 0 = 0 (logits of -inf)
        self.scalars.add_(torch.stack([brier, nll, entropy, confidence]).double().sum(dim=1))

    def compute(self) -> dict[str, torch.Tensor]:
        """Unpack the sums into confusion, confidence, thresholded confusion, bins and scalars."""
        c, levels = self.num_classes, len(self.thresholds) + 1
        cells = self.cells.view(c, c, levels, 2)
        counts = cells[..., 0]  # (C, C, levels)
        # Predictions reaching threshold j are those with at least j + 1 thresholds reached.
        reached = counts.flip(-1).cumsum(-1).flip(-1)[..., 1:]  # (C, C, T)
        a, b, h, _ = self._offsets
        return {
            "confusion": counts.sum(-1).round().long(),
            "confidence_sums": cells[..., 1].sum(-1),
            "thresholded": reached.permute(2, 0, 1).round().long(),
            "calibration": self.bins[a:b],
            "fine": self.bins[b:h],
            "hist_correct": self.bins[h:h + _HIST_BINS + 1],
            "hist_wrong": self.bins[h + _HIST_BINS + 1:],
            "scalars": self.scalars,
        }


def classification_scores(confusion: torch.Tensor) -> dict[str, Any]:
    """Accuracy and per-class / macro precision, recall and F1 from a confusion matrix (rows: true).

    Undefined ratios count as 0, and the macro average leaves out classes that appear neither as target nor as
    prediction, as torchmetrics does (the tests check agreement with torchmetrics).
    """
    cm = confusion.double()
    tp = cm.diagonal()
    predicted, actual = cm.sum(dim=0), cm.sum(dim=1)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp_min(1), torch.zeros_like(tp))
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp_min(1e-300), torch.zeros_like(tp))
    present = (predicted + actual) > 0
    weight = present.double() / present.sum().clamp_min(1)
    return {"accuracy": float(tp.sum() / cm.sum().clamp_min(1)),
            "macro_precision": float((precision * weight).sum()), "macro_recall": float((recall * weight).sum()),
            "macro_f1": float((f1 * weight).sum()), "precision": precision, "recall": recall, "f1": f1}


class ConfidenceMonitor(ProbeCallback):
    """Confusion matrices with per-cell confidence, calibration and collapse indicators, per epoch.

    Contract: ``validation_step`` and ``test_step`` return a dict holding the logits (``(N, C)``) and the
    targets (``(N,)``) under ``logits_key`` and ``target_key``. The monitor accumulates constant-memory sums
    (never the predictions themselves), reduced across DDP processes, and at the end of every validation and
    test epoch computes:

    - the confusion matrix (counts and row-normalised) and the mean top-label confidence of each cell (cells
      with fewer than ``min_count`` predictions masked), and confusion matrices restricted to predictions with
      confidence ``>=`` each of ``confidence_thresholds``;
    - accuracy, macro and per-class precision/recall/F1 (from the confusion matrix, as torchmetrics defines
      them: tested against it), ECE (top-label, ``n_bins`` equal-width
      bins, torchmetrics' binning), adaptive ECE (``n_bins`` equal-count bins formed from a fine histogram of
      ``adaptive_resolution`` bins), MCE, Brier score, NLL, mean confidence, mean predictive entropy, a
      reliability diagram and confidence histograms of correct and wrong predictions;
    - collapse indicators: the predicted against the true class distribution, the normalised entropy of the
      predicted distribution, the share of the most-predicted class; a warning when the normalised entropy
      falls below ``collapse_entropy``.

    Results go to ``confidence.jsonl`` (one record per epoch and stage; ``confusion_matrix`` and
    ``confidence_matrix`` as lists of rows), to the loggers as ``confidence/<stage>/<metric>``, and as figures
    (``<stage>_confusion.png``, ``<stage>_confusion_thresholds.png``, ``<stage>_calibration.png``). At the end
    of a test epoch a plain-text table of the headline numbers is printed.

    Args:
        logits_key: Key of the logits in the step output dict.
        target_key: Key of the targets in the step output dict.
        n_bins: Equal-width calibration bins (and equal-count bins of the adaptive ECE).
        adaptive_resolution: Fine bins from which the adaptive ECE's equal-count bins are formed.
        confidence_thresholds: Thresholds of the restricted confusion matrices, each in (0, 1].
        min_count: Cells with fewer predictions are masked in the confidence heatmap.
        collapse_entropy: Warn when the normalised entropy of the predicted classes falls below this.
        plot_every_n_epochs: Draw validation figures every n epochs (test figures are always drawn).
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[ConfidenceMonitor(n_bins=10)])
    """

    probe_name = "confidence"

    def __init__(
        self,
        logits_key: str = "logits",
        target_key: str = "target",
        n_bins: int = 15,
        adaptive_resolution: int = 1000,
        confidence_thresholds: Sequence[float] = (0.5, 0.9, 0.99),
        min_count: int = 5,
        collapse_entropy: float = 0.5,
        plot_every_n_epochs: int = 1,
        output_dir: Optional[str] = None,
    ) -> None:
        super().__init__(output_dir)
        for name, value in (("logits_key", logits_key), ("target_key", target_key)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"Expected `{name}` to be a non-empty string, but got {value!r}")
        check_positive_int("n_bins", n_bins)
        check_positive_int("adaptive_resolution", adaptive_resolution)
        check_positive_int("min_count", min_count)
        check_positive_int("plot_every_n_epochs", plot_every_n_epochs)
        thresholds = tuple(confidence_thresholds)
        for t in thresholds:
            check_fraction("confidence_thresholds", t, high_open=False)
        check_fraction("collapse_entropy", collapse_entropy, low_open=False, high_open=False)
        if adaptive_resolution < n_bins:
            raise ValueError(f"Expected `adaptive_resolution` >= `n_bins` ({n_bins}), but got {adaptive_resolution}")
        self.logits_key, self.target_key = logits_key, target_key
        self.n_bins, self.adaptive_resolution = n_bins, adaptive_resolution
        self.confidence_thresholds = thresholds
        self.min_count, self.collapse_entropy = min_count, collapse_entropy
        self.plot_every_n_epochs = plot_every_n_epochs
        self._states: dict[str, ConfidenceState] = {}
        self.last_results: dict[str, dict[str, Any]] = {}

    def _state_config(self) -> Mapping[str, Any]:
        return {"logits_key": self.logits_key, "target_key": self.target_key, "output_dir": self._output_dir_arg}

    # -- accumulation -------------------------------------------------------------------------------
    def _new_state(self, num_classes: int, device: torch.device) -> ConfidenceState:
        state = ConfidenceState(num_classes, self.n_bins, self.confidence_thresholds, self.adaptive_resolution)
        return state.to(device)

    def _update(self, trainer: pl.Trainer, stage: str, outputs: Any) -> None:
        if trainer.sanity_checking:
            return
        if not isinstance(outputs, Mapping) or self.logits_key not in outputs or self.target_key not in outputs:
            found = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise KeyError(
                f"ConfidenceMonitor needs `{self.logits_key}` and `{self.target_key}` in the dict returned by "
                f"`{stage}_step`, but found {found}. Return them (see the class docstring) or set "
                "`logits_key` / `target_key`.")
        logits, target = outputs[self.logits_key], outputs[self.target_key]
        if stage not in self._states:
            self._states[stage] = self._new_state(logits.shape[-1], logits.device)
        self._states[stage].update(logits.detach(), target.detach())

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(trainer, "val", outputs)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(trainer, "test", outputs)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            plot = trainer.current_epoch % self.plot_every_n_epochs == 0
            self._finish(trainer, "val", plot)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = self._finish(trainer, "test", plot=True)
        if results is not None:
            rank_zero_info(format_table(results))

    # -- results ------------------------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer, stage: str, plot: bool) -> Optional[dict[str, Any]]:
        collection = self._states.get(stage)
        if collection is None:
            return None
        computed = collection.compute()  # every rank: torchmetrics sums the states across processes
        collection.reset()
        results = summarize({k: v.cpu() for k, v in computed.items()}, self.confidence_thresholds)
        self.last_results[stage] = results
        if results["prediction_entropy_normalized"] < self.collapse_entropy:
            rank_zero_warn(f"ConfidenceMonitor: predictions collapsed in {stage} epoch {trainer.current_epoch}: "
                           f"normalised entropy {results['prediction_entropy_normalized']:.3f} < "
                           f"{self.collapse_entropy}, most-predicted class holds {results['top_class_share']:.1%}.")
        if not trainer.is_global_zero:
            return results
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step, "stage": stage, **results}
        self.write_records(trainer, [record])
        scalars = {f"{self.probe_name}/{stage}/{k}": v for k, v in results.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.log_scalars(trainer, scalars, trainer.global_step)
        if plot:
            self._plot(trainer, stage, results)
        return results

    def _plot(self, trainer: pl.Trainer, stage: str, results: dict[str, Any]) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        counts = np.asarray(results["confusion_matrix"], dtype=float)
        confidence = np.asarray(results["confidence_matrix"], dtype=float)
        confidence[counts < self.min_count] = np.nan
        with np.errstate(invalid="ignore"):
            normalised = counts / counts.sum(axis=1, keepdims=True)
        fig = Figure(figsize=(17, 5))
        fig.subplots_adjust(left=0.04, right=0.98, bottom=0.1, top=0.86, wspace=0.25)
        axes = fig.subplots(1, 3)
        labels = [str(i) for i in range(len(counts))]
        heatmap(counts, "counts (rows: true, cols: predicted)", labels, labels, annotate=True, ax=axes[0])
        heatmap(normalised, "row-normalised", labels, labels, vmin=0, vmax=1, ax=axes[1])
        heatmap(confidence, f"mean confidence (cells with < {self.min_count} masked)", labels, labels, 0, 1,
                cmap="magma", annotate=True, ax=axes[2])
        fig.suptitle(f"{stage} confusion, epoch {epoch}")
        self.save_figure(trainer, fig, f"{stage}_confusion.png", f"{self.probe_name}/{stage}/confusion", step)

        fig = Figure(figsize=(5.5 * len(self.confidence_thresholds), 5))
        fig.subplots_adjust(left=0.05, right=0.98, bottom=0.1, top=0.9, wspace=0.25)
        axes = np.atleast_1d(fig.subplots(1, len(self.confidence_thresholds)))
        for ax, (t, entry) in zip(axes, results["thresholded"].items()):
            heatmap(np.asarray(entry["confusion_matrix"]), f"confidence >= {t}: coverage {entry['coverage']:.1%}",
                    labels, labels, ax=ax)
        self.save_figure(trainer, fig, f"{stage}_confusion_thresholds.png",
                         f"{self.probe_name}/{stage}/confusion_thresholds", step)

        self.save_figure(trainer, calibration_figure(results, f"{stage}, epoch {epoch}"), f"{stage}_calibration.png",
                         f"{self.probe_name}/{stage}/calibration", step)


def summarize(state: Mapping[str, torch.Tensor], thresholds: Sequence[float]) -> dict[str, Any]:
    """Turn the reduced sums into the JSON-friendly record of one epoch."""
    scores = classification_scores(state["confusion"])
    confusion = state["confusion"].double()
    n = float(confusion.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence_matrix = (state["confidence_sums"] / confusion).numpy()
    predicted, true = confusion.sum(dim=0), confusion.sum(dim=1)
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
        "confusion_matrix": state["confusion"].tolist(),
        "confidence_matrix": confidence_matrix.tolist(),
        "reliability": {"count": calibration[:, 0].tolist(), "confidence_sum": calibration[:, 1].tolist(),
                        "correct_sum": calibration[:, 2].tolist()},
        "confidence_histogram": {"correct": state["hist_correct"][:, 0].tolist(),
                                 "wrong": state["hist_wrong"][:, 0].tolist()},
        "thresholded": {},
    }
    for t, matrix in zip(thresholds, state["thresholded"]):
        kept = float(matrix.sum())
        out["thresholded"][str(t)] = {"coverage": kept / max(n, 1.0),
                                      "accuracy": float(matrix.diagonal().sum()) / kept if kept else None,
                                      "confusion_matrix": matrix.tolist()}
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
    h_edges = np.linspace(0, 1, _HIST_BINS + 1)
    for name, color in (("correct", "tab:green"), ("wrong", "tab:red")):
        counts = np.asarray(results["confidence_histogram"][name], dtype=float)
        counts = np.append(counts[:-2], counts[-2] + counts[-1])  # fold confidence == 1 into the last bin
        ax_hist.stairs(counts, h_edges, label=name, color=color, fill=True, alpha=0.5)
    ax_hist.set(xlabel="confidence", ylabel="predictions", title="confidence of correct vs wrong")
    ax_hist.legend(fontsize=7)
    classes = np.arange(len(results["true_distribution"]))
    ax_dist.bar(classes - 0.2, results["true_distribution"], 0.4, label="true")
    ax_dist.bar(classes + 0.2, results["predicted_distribution"], 0.4, label="predicted")
    ax_dist.set(xlabel="class", ylabel="share",
                title=f"class distribution: normalised entropy {results['prediction_entropy_normalized']:.2f}")
    ax_dist.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def format_table(results: Mapping[str, Any]) -> str:
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
    lines = ["ConfidenceMonitor (test)", "-" * (width + 40)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
