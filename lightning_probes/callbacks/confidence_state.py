"""`ConfidenceState`: the constant-memory running sums behind `ConfidenceMonitor` (a torchmetrics ``Metric``).

`lightning_probes.callbacks.confidence_record` turns the summed state into the monitor's record (`summarize`)
and its figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torchmetrics import Metric

from lightning_probes.functional.calibration import (
    calibration_bin_index,
    calibration_values,
    confusion_index,
    one_hot_to_index,
    prediction_terms,
    threshold_level,
)

__all__ = ["HIST_BINS", "ConfidenceState"]

#: Bins of the confidence histograms of correct and of wrong predictions.
HIST_BINS = 20


class ConfidenceState(Metric):
    """Constant-memory running sums behind `ConfidenceMonitor`, summed across processes by torchmetrics.

    The per-sample pieces come from `lightning_probes.functional.calibration` (`prediction_terms`,
    `calibration_bin_index`, `calibration_values`, `confusion_index`, `threshold_level`), the same code the
    one-shot functions there use; the state only packs them into two ``index_add_`` calls per batch, with no
    host synchronisation (speed matters: a validation batch of a small model takes milliseconds):

    - ``cells``: per (true class, predicted class, number of ``thresholds`` the confidence reaches):
      ``[count, sum of confidence]``;
    - ``bins``: per calibration bin (``n_bins + 1``, torchmetrics' binning), fine bin
      (``adaptive_resolution + 1``) and histogram bin of correct and of wrong predictions (``21`` each):
      ``[count, sum of confidence, sum of correct]``;
    - ``scalars``: sums of Brier score, NLL, predictive entropy and confidence;
    - ``target_min``/``target_max``/``soft_targets``: the smallest and largest target seen (``ignore_index``
      left out) and the number of soft-label rows, so that invalid targets are reported after the epoch
      without a check per batch. Samples whose target is ``ignore_index`` or outside ``[0, C)`` add nothing.

    Args:
        num_classes: Number of classes.
        n_bins: Equal-width calibration bins.
        thresholds: Confidence thresholds of the restricted confusion matrices (sorted here).
        adaptive_resolution: Fine equal-width bins from which the equal-count (adaptive) bins are formed.
        ignore_index: Targets equal to it are left out, as torchmetrics' ``ignore_index`` does.
    """

    full_state_update = False

    def __init__(self, num_classes: int, n_bins: int, thresholds: Sequence[float], adaptive_resolution: int,
                 ignore_index: Optional[int] = None) -> None:
        super().__init__()
        self.num_classes, self.n_bins, self.thresholds = num_classes, n_bins, tuple(sorted(thresholds))
        self.adaptive_resolution, self.ignore_index = adaptive_resolution, ignore_index
        levels = len(self.thresholds) + 1
        self._offsets = (0, n_bins + 1, n_bins + 1 + adaptive_resolution + 1,
                         n_bins + 1 + adaptive_resolution + 1 + 2 * (HIST_BINS + 1))
        self.add_state("cells", torch.zeros(num_classes * num_classes * levels, 2, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("bins", torch.zeros(self._offsets[-1], 3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("scalars", torch.zeros(4, dtype=torch.float64), dist_reduce_fx="sum")  # brier, nll, H, conf
        self.add_state("target_min", torch.tensor(0, dtype=torch.long), dist_reduce_fx="min")
        self.add_state("target_max", torch.tensor(0, dtype=torch.long), dist_reduce_fx="max")
        self.add_state("soft_targets", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.register_buffer("_threshold_values", torch.tensor(self.thresholds, dtype=torch.float32), persistent=False)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: ``logits`` ``(N, C)``; ``target`` ``(N,)`` class indices or ``(N, C)`` one-hot."""
        if target.ndim == 2:
            target, one_hot = one_hot_to_index(target)
            self.soft_targets += (~one_hot).sum()
        target = target.long()
        if target.numel() == 0:
            return
        counted = None if self.ignore_index is None else target != self.ignore_index
        seen = target if counted is None else torch.where(counted, target, 0)
        low, high = torch.aminmax(seen)
        self.target_min = torch.minimum(self.target_min, low)
        self.target_max = torch.maximum(self.target_max, high)
        keep = (seen >= 0) & (seen < self.num_classes)
        if counted is not None:
            keep &= counted
        safe = torch.where(keep, seen, 0)  # a valid index everywhere; `keep` zeroes what it adds
        terms = prediction_terms(logits, safe)
        confidence, correct = terms["confidence"], terms["correct"]
        keep = keep.unsqueeze(1)  # (N, 1)
        values = torch.where(keep, calibration_values(confidence, correct), 0.0)  # (N, 3): [1, conf, correct]
        levels = len(self.thresholds) + 1
        cell = confusion_index(safe, terms["predicted"], self.num_classes) * levels \
            + threshold_level(confidence, self._threshold_values)
        self.cells.index_add_(0, cell, values[:, :2])
        hist = calibration_bin_index(confidence, HIST_BINS) + (1 - correct.long()) * (HIST_BINS + 1)
        index = torch.cat([calibration_bin_index(confidence, self.n_bins),
                           calibration_bin_index(confidence, self.adaptive_resolution) + self._offsets[1],
                           hist + self._offsets[2]])
        self.bins.index_add_(0, index, values.repeat(3, 1))
        per_sample = torch.stack([terms["brier"], terms["nll"], terms["entropy"], confidence], dim=1).double()
        self.scalars.add_(torch.where(keep, per_sample, 0.0).sum(dim=0))

    def compute(self) -> dict[str, torch.Tensor]:
        """Unpack the sums into confusion, confidence, thresholded confusion, bins, scalars and target checks."""
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
            "hist_correct": self.bins[h:h + HIST_BINS + 1],
            "hist_wrong": self.bins[h + HIST_BINS + 1:],
            "scalars": self.scalars,
            "target_min": self.target_min,
            "target_max": self.target_max,
            "soft_targets": self.soft_targets,
        }
