"""`ConfidenceState`: the constant-memory running sums behind `ConfidenceMonitor` (a torchmetrics ``Metric``).

`lightning_probes.callbacks.confidence_record` turns the summed state into the monitor's record (`summarize`)
and its figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torchmetrics import Metric

from lightning_probes.functional.calibration import (
    calibration_bin_index,
    calibration_values,
    confusion_index,
    merge_pairs,
    one_hot_to_index,
    prediction_terms,
    threshold_level,
)

__all__ = ["HIST_BINS", "ConfidenceState"]

#: Bins of the confidence histograms of correct and of wrong predictions.
HIST_BINS = 20
#: A sparse state merges its rows once the unmerged ones are more than this and than the merged ones.
MERGE_AT = 65_536


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

    With ``sparse=True`` (many classes: a dense ``cells`` is ``16 (T + 1) C^2`` bytes, 161 GB at 50,257 classes)
    ``cells`` is replaced by what the record reads of it, exactly:

    - ``classes``: the true, predicted and correct count of every class (``3 C``: every per-class and macro
      score, the class distributions);
    - ``levels``: per number of thresholds reached ``[count, correct count]`` (the coverage and accuracy of each
      threshold);
    - ``pairs``: a sparse confusion, rows ``[target * C + predicted, count, sum of confidence]`` (float64, the
      cell exact below 2**53), one per cell seen. Each batch appends its rows; they are merged
      (`lightning_probes.functional.calibration.merge_pairs`) once the unmerged rows outnumber the merged ones
      (and 65,536), so the state holds about two rows per distinct cell seen, 24 bytes each. Under DDP the rows
      of every rank are gathered (a ``cat`` state) and merged in `compute`.

    Args:
        num_classes: Number of classes.
        n_bins: Equal-width calibration bins.
        thresholds: Confidence thresholds of the restricted confusion matrices (sorted here).
        adaptive_resolution: Fine equal-width bins from which the equal-count (adaptive) bins are formed.
        ignore_index: Targets equal to it are left out, as torchmetrics' ``ignore_index`` does.
        sparse: Keep the sparse confusion above instead of the dense ``cells``.
    """

    full_state_update = False

    def __init__(self, num_classes: int, n_bins: int, thresholds: Sequence[float], adaptive_resolution: int,
                 ignore_index: Optional[int] = None, sparse: bool = False) -> None:
        super().__init__()
        self.num_classes, self.n_bins, self.thresholds = num_classes, n_bins, tuple(sorted(thresholds))
        self.adaptive_resolution, self.ignore_index, self.sparse = adaptive_resolution, ignore_index, bool(sparse)
        levels = len(self.thresholds) + 1
        self._offsets = (0, n_bins + 1, n_bins + 1 + adaptive_resolution + 1,
                         n_bins + 1 + adaptive_resolution + 1 + 2 * (HIST_BINS + 1))
        if self.sparse:
            self.add_state("classes", torch.zeros(3 * num_classes, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("levels", torch.zeros(levels, 2, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("pairs", [], dist_reduce_fx="cat")
            self._merged_rows = 0  # rows of pairs[0] once merged; the rows after it are unmerged
            self._pending_rows = 0
        else:
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
        level = threshold_level(confidence, self._threshold_values)
        if self.sparse:
            self._update_sparse(safe, terms["predicted"], level, values)
        else:
            cell = confusion_index(safe, terms["predicted"], self.num_classes) * levels + level
            self.cells.index_add_(0, cell, values[:, :2])
        hist = calibration_bin_index(confidence, HIST_BINS) + (1 - correct.long()) * (HIST_BINS + 1)
        index = torch.cat([calibration_bin_index(confidence, self.n_bins),
                           calibration_bin_index(confidence, self.adaptive_resolution) + self._offsets[1],
                           hist + self._offsets[2]])
        self.bins.index_add_(0, index, values.repeat(3, 1))
        per_sample = torch.stack([terms["brier"], terms["nll"], terms["entropy"], confidence], dim=1).double()
        self.scalars.add_(torch.where(keep, per_sample, 0.0).sum(dim=0))

    def _update_sparse(self, target: torch.Tensor, predicted: torch.Tensor, level: torch.Tensor,
                       values: torch.Tensor) -> None:
        """Per-class and per-level counts, and this batch's rows of the sparse confusion (no host sync)."""
        counted, correct = values[:, 0], values[:, 2]  # 0 for the samples left out
        c = self.num_classes
        self.classes.index_add_(0, torch.cat([target, predicted + c, target + 2 * c]),
                                torch.cat([counted, counted, correct]))
        self.levels.index_add_(0, level, torch.stack([counted, correct], dim=1))
        # Left-out samples add rows of count 0 (no mask: no host synchronisation); `top_confusions` drops them.
        rows = torch.stack([confusion_index(target, predicted, c).double(), counted, values[:, 1]], dim=1)
        self.pairs.append(rows)
        self._pending_rows += len(rows)
        if self._pending_rows > max(MERGE_AT, self._merged_rows):
            self._merge()

    def _merge(self) -> None:
        """Merge the rows of ``pairs`` into one row per cell."""
        merged = merge_pairs(torch.cat(self.pairs)) if self.pairs else torch.zeros(0, 3, dtype=torch.float64,
                                                                                   device=self.levels.device)
        self.pairs = [merged]
        self._merged_rows, self._pending_rows = len(merged), 0

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """torchmetrics' sync; a sparse state with no rows gets an empty ``(0, 3)`` float64 one first (torchmetrics
        would gather a 1-D float32 placeholder, which does not fit the other ranks' rows)."""
        if self.sparse and not (self.pairs if isinstance(self.pairs, list) else True):
            self._merge()
        super().sync(*args, **kwargs)

    def reset(self) -> None:
        super().reset()
        if self.sparse:
            self._merged_rows = self._pending_rows = 0

    def pair_rows(self) -> int:
        """Rows the sparse confusion holds now (merged and not; 0 for a dense state)."""
        return self._merged_rows + self._pending_rows if self.sparse else 0

    def compute(self) -> dict[str, torch.Tensor]:
        """Unpack the sums into confusion, confidence, thresholded confusion, bins, scalars and target checks.

        A sparse state gives ``classes``, ``levels`` and the merged ``pairs`` instead of ``confusion``,
        ``confidence_sums`` and ``thresholded``.
        """
        a, b, h, _ = self._offsets
        out = {
            "calibration": self.bins[a:b],
            "fine": self.bins[b:h],
            "hist_correct": self.bins[h:h + HIST_BINS + 1],
            "hist_wrong": self.bins[h + HIST_BINS + 1:],
            "scalars": self.scalars,
            "target_min": self.target_min,
            "target_max": self.target_max,
            "soft_targets": self.soft_targets,
        }
        if self.sparse:
            pairs = [p for p in self.pairs if p.numel()] if isinstance(self.pairs, list) else [self.pairs]
            rows = torch.cat([p.view(-1, 3) for p in pairs]) if pairs else torch.zeros(0, 3, dtype=torch.float64)
            out.update(classes=self.classes.view(3, -1), levels=self.levels, pairs=merge_pairs(rows.to(self.classes)))
            return out
        c, levels = self.num_classes, len(self.thresholds) + 1
        cells = self.cells.view(c, c, levels, 2)
        counts = cells[..., 0]  # (C, C, levels)
        # Predictions reaching threshold j are those with at least j + 1 thresholds reached.
        reached = counts.flip(-1).cumsum(-1).flip(-1)[..., 1:]  # (C, C, T)
        out.update(confusion=counts.sum(-1).round().long(), confidence_sums=cells[..., 1].sum(-1),
                   thresholded=reached.permute(2, 0, 1).round().long())
        return out


def dense_bytes(num_classes: int, thresholds: int) -> int:
    """Planned peak bytes of a dense state and its record: the state (``16 (T + 1)`` bytes a cell), the copies
    `ConfidenceState.compute` makes (``24 (T + 1) + 8 (T + 4)``) and the record's matrices as Python lists and
    JSON (about ``40 (T + 2)``), per cell of the ``C x C`` confusion."""
    levels = thresholds + 1
    return num_classes * num_classes * (16 * levels + 24 * levels + 8 * (thresholds + 4) + 40 * (thresholds + 2))


def sparse_bytes(num_classes: int) -> int:
    """Planned bytes of a sparse state before its pairs: the per-class counts (``3 C`` float64), the record's
    per-class lists (about ``5 x 40 C``) and room for the unmerged rows of one merge (``2 x 24 x MERGE_AT``)."""
    return 24 * num_classes + 200 * num_classes + 48 * MERGE_AT
