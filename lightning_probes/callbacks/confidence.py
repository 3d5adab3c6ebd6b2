"""`ConfidenceMonitor`: confusion with per-cell confidence, calibration and collapse, per validation/test epoch."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_probes.budget import FLOOR_BYTES, format_bytes
from lightning_probes.callbacks.base import (
    DEFAULT_FLUSH_SECS,
    FigureSpec,
    ProbeCallback,
    check_fraction,
    check_plot_every,
    check_positive_int,
)
from lightning_probes.callbacks.confidence_record import TOP_CONFUSIONS, format_table, stage_figures, summarize
from lightning_probes.callbacks.confidence_state import ConfidenceState, dense_bytes, sparse_bytes
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.functional.calibration import (
    classification_scores,
    flatten_class_dim,
    one_hot_to_index,
)
from lightning_probes.plotting import colormapped

__all__ = ["HEADLINE_METRICS", "ConfidenceMonitor", "ConfidenceState", "classification_scores", "summarize"]

log = logging.getLogger(__name__)

#: Put into ``trainer.callback_metrics`` as ``<name>/<stage>/<metric>``, for ``EarlyStopping``/``ModelCheckpoint``.
HEADLINE_METRICS = ("ece", "accuracy", "prediction_entropy_normalized")
#: Values of ``confusion``: how the confusion state is kept.
CONFUSION_MODES = ("auto", "dense", "sparse")
#: TensorBoard custom-scalars charts: every stage (and data loader) of each listed metric as lines of one chart.
_LAYOUT = {
    "calibration": ("ece", "adaptive_ece", "mce"),
    "accuracy": ("accuracy", "macro_f1", "macro_precision", "macro_recall"),
    "collapse": ("prediction_entropy_normalized", "top_class_share"),
    "proper scores": ("brier", "nll"),
    "confidence": ("mean_confidence", "mean_entropy"),
}


def _target_problem(low: int, high: int, soft: int, num_classes: int) -> Optional[str]:
    """What is wrong with the targets, from their range and soft-label count; ``None`` when nothing."""
    if soft:
        return (f"{soft} rows are soft labels (rows that are not one-hot, or binary labels other than 0 and 1); "
                "ConfidenceMonitor scores top-label predictions against "
                "class indices: return class indices (or one-hot rows)")
    bad = low if low < 0 else high if high >= num_classes else None
    if bad is None:
        return None
    return (f"holds the value {bad}, outside the class range [0, {num_classes - 1}] of the logits ({num_classes} "
            "classes); set `ignore_index` if it marks samples to leave out")


class MissingOutputError(ProbeConfigurationError, KeyError):
    """The step output lacks ``logits_key`` or ``target_key``: a configuration error (refused before any step when
    the sanity check finds it) that is also a ``KeyError``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfidenceMonitor(ProbeCallback):
    """Confusion matrices with per-cell confidence, calibration and collapse indicators, per epoch.

    Contract: ``validation_step`` and ``test_step`` return a dict holding the logits and the targets under
    ``logits_key`` and ``target_key``:

    - logits ``(N, C)`` with ``C >= 2``, and targets ``(N,)`` of class indices (an integer or bool dtype);
    - targets may instead be one-hot, of the logits' shape: each row is turned into its class index (argmax).
      Soft labels (rows that are not exactly one-hot) are an error: the statistics are top-label ones, and
      silently taking the argmax of a soft label would report a made-up accuracy;
    - logits ``(N, C, d1, ...)`` (segmentation-like) with targets ``(N, d1, ...)``: every position is a sample,
      as in torchmetrics' multiclass metrics (``multidim_average="global"``);
    - one-logit binary classifiers: logits ``(N,)`` or ``(N, 1)`` (``(N, 1, d1, ...)`` per position) holding
      ``z``, with targets 0/1 of shape ``(N,)`` (or ``(N, 1)``). They are scored as two classes ``{0, 1}`` with
      probabilities ``[1 - sigmoid(z), sigmoid(z)]`` (the logits ``[0, z]``), so the prediction is 1 exactly when
      ``z > 0`` and every statistic is the two-class one: the top-label confidence is ``max(p, 1 - p)``, the
      Brier score sums over both classes (twice the binary ``(p - y)^2``). Floating targets must be exactly 0 or
      1 (anything else counts as a soft label, an error) and cannot be combined with ``ignore_index``;
    - targets equal to ``ignore_index`` are left out (torchmetrics' ``ignore_index``); any other target outside
      ``[0, C)`` is an error naming the value.

    The contract is checked from the first batch on, also during Lightning's sanity check (so a wrong key,
    shape or target fails within seconds; sanity batches are never counted). Shapes are checked on every batch
    (no cost); target values on the host at the first batch of every epoch, and for the other batches through
    the accumulated minimum/maximum after the epoch (no host synchronisation per batch).

    The monitor accumulates constant-memory sums (never the predictions themselves), reduced across DDP
    processes, and at the end of every validation and test epoch computes:

    - the confusion matrix (counts and row-normalised) and the mean top-label confidence of each cell (cells
      with fewer than ``min_count`` predictions masked), and confusion matrices restricted to predictions with
      confidence ``>=`` each of ``confidence_thresholds``;
    - accuracy, macro and per-class precision/recall/F1 (from the confusion matrix, as torchmetrics defines
      them: tested against it), ECE (top-label, ``n_bins`` equal-width bins, torchmetrics' binning), adaptive
      ECE (``n_bins`` equal-count bins formed from a fine histogram of ``adaptive_resolution`` bins), MCE,
      Brier score, NLL, mean confidence, mean predictive entropy, a reliability diagram and confidence
      histograms of correct and wrong predictions;
    - collapse indicators: the predicted against the true class distribution, the normalised entropy of the
      predicted distribution, the share of the most-predicted class; a warning when the normalised entropy
      falls below ``collapse_entropy``.

    Outputs (``<name>`` is ``confidence`` by default, ``<stage>`` is ``val`` or ``test``):

    - ``<name>.jsonl``: one record per epoch, stage and data loader (``stage``, ``dataloader_idx``,
      ``confusion_matrix`` and ``confidence_matrix`` as lists of rows, ...);
    - scalars ``<name>/<stage>/<metric>`` to every logger; the headline metrics (``ece``, ``accuracy``,
      ``prediction_entropy_normalized``) also go to ``trainer.callback_metrics`` at the end of the epoch, so
      ``EarlyStopping(monitor="confidence/val/ece", mode="min")`` and ``ModelCheckpoint`` can use them;
    - figures ``<name>/<stage>_confusion.png``, ``<stage>_confusion_thresholds.png``, ``<stage>_calibration.png``
      (TensorBoard tags ``<name>/<stage>/confusion``, ...); a plain-text table at the end of a test epoch.

    Many classes (a language model's vocabulary: logits ``(N, V, T)`` against tokens ``(N, T)``): a dense
    confusion grows with the square of the classes. With ``confusion="auto"`` the monitor plans at the first
    batch (sanity check included) inside its share of the memory budget that the Trainer's probes share (at
    least 64 MiB; its ``max_memory_gb`` when set) and logs the plan: dense when the dense state and its record
    fit (up to about 400 classes for a 64 MiB share), else sparse. A sparse record holds every statistic above
    with the same value as the dense one, and ``confusion_format: "sparse"``; it has no ``confusion_matrix``,
    ``confidence_matrix`` or thresholded matrices (their coverage and accuracy stay), and its confusion figure is
    ``<stage>_top_confusions.png``. Every record lists its ``top_confusions`` most frequent off-diagonal
    cells (``true``, ``predicted``, ``count``, ``mean_confidence``, ties in row-major order; ``cells``: the
    off-diagonal cells with a prediction; ``other_count``: the predictions in the cells not listed). A sparse
    state holds about 24 bytes per distinct (target, predicted) cell seen in the epoch (at most one per
    sample) and warns once if that outgrows its share.

    Several validation (or test) data loaders are accumulated and reported separately, named as Lightning names
    ``self.log`` metrics of several loaders: the scalars and headline metrics get the suffix
    ``/dataloader_idx_<i>`` (``confidence/val/ece/dataloader_idx_1``), the figures ``<stage>_dataloader_idx_<i>_*.png``,
    and every record carries its ``dataloader_idx`` (0 with a single loader, where no suffix is added).

    Args:
        logits_key: Key of the logits in the step output dict.
        target_key: Key of the targets in the step output dict.
        n_bins: Equal-width calibration bins (and equal-count bins of the adaptive ECE).
        adaptive_resolution: Fine bins from which the adaptive ECE's equal-count bins are formed.
        confidence_thresholds: Thresholds of the restricted confusion matrices, each in (0, 1].
        min_count: Cells with fewer predictions are masked in the confidence heatmap.
        collapse_entropy: Warn when the normalised entropy of the predicted classes falls below this.
        plot_every_n_epochs: Draw the validation figures every n completed epochs and at the end of the fit; 0:
            none during training (``lightning-probes plot`` redraws them from the JSONL). Test figures are always
            drawn; the row-normalised confusion matrix goes to the image loggers as a colour-mapped image
            (``<name>/<stage>/heatmap/confusion``) at every epoch.
        ignore_index: Targets equal to this value are left out (e.g. ``-100`` or ``255`` for unlabelled pixels).
        confusion: How the confusion is kept. ``"dense"``: the ``C x C`` matrices (``16 (T + 1) C^2`` bytes with
            ``T`` thresholds, 64 MB at 1,000 classes, 161 GB at 50,257); ``"sparse"``: per-class counts and the
            (target, predicted) cells seen, exact for every statistic but without the full matrices in the
            record; ``"auto"`` (default): dense when the dense state and its record (about ``(88 T + 152) C^2``
            bytes, `lightning_probes.callbacks.confidence_state.dense_bytes`) fit the probe's memory share, else
            sparse (see "Many classes" above).
        top_confusions: Off-diagonal cells listed in each record's ``top_confusions``.
        max_memory_gb: This probe's own memory allowance in GB (1e9 bytes) for ``confusion="auto"``; ``None``
            (default): its share of the probes' memory budget (`lightning_probes.set_memory_budget`).
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default ``confidence``.
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: After the run started, ``"warn"`` (default) turns an exception inside the probe into one warning,
            a ``{"disabled": true}`` record and a disabled probe while training goes on; ``"raise"`` re-raises.
            ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"`` (see `lightning_probes.callbacks.guard`).

    Raises:
        KeyError: If the step output lacks ``logits_key`` or ``target_key`` (the message lists the keys found; a
            `lightning_probes.errors.ProbeConfigurationError` too, so the sanity check refuses the run with it).
        ValueError: For logits or targets of the wrong shape or dtype, soft-label targets, or targets outside
            ``[0, C)`` that are not ``ignore_index``.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> from pytorch_lightning.callbacks import EarlyStopping
        >>> trainer = Trainer(callbacks=[ConfidenceMonitor(n_bins=10),
        ...                              EarlyStopping(monitor="confidence/val/ece", mode="min")])
    """

    probe_name = "confidence"
    uses_memory_budget = True

    def __init__(
        self,
        logits_key: str = "logits",
        target_key: str = "target",
        n_bins: int = 15,
        adaptive_resolution: int = 1000,
        confidence_thresholds: Sequence[float] = (0.5, 0.9, 0.99),
        min_count: int = 5,
        collapse_entropy: float = 0.5,
        plot_every_n_epochs: int = 10,
        ignore_index: Optional[int] = None,
        confusion: Literal["auto", "dense", "sparse"] = "auto",
        top_confusions: int = TOP_CONFUSIONS,
        max_memory_gb: Optional[float] = None,
        output_dir: Optional[str] = None,
        name: Optional[str] = None,
        flush_every_n_steps: Optional[int] = None,
        flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
        on_error: Optional[str] = None,
    ) -> None:
        super().__init__(output_dir, name, flush_every_n_steps=flush_every_n_steps, flush_secs=flush_secs,
                         on_error=on_error)
        for arg, value in (("logits_key", logits_key), ("target_key", target_key)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"Expected `{arg}` to be a non-empty string, but got {value!r}")
        check_positive_int("n_bins", n_bins)
        check_positive_int("adaptive_resolution", adaptive_resolution)
        check_positive_int("min_count", min_count)
        thresholds = tuple(confidence_thresholds)
        for t in thresholds:
            check_fraction("confidence_thresholds", t, high_open=False)
        check_fraction("collapse_entropy", collapse_entropy, low_open=False, high_open=False)
        if adaptive_resolution < n_bins:
            raise ValueError(f"Expected `adaptive_resolution` >= `n_bins` ({n_bins}), but got {adaptive_resolution}")
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise ValueError(f"Expected `ignore_index` to be an integer or None, but got {ignore_index!r}")
        self.logits_key, self.target_key = logits_key, target_key
        self.n_bins, self.adaptive_resolution = n_bins, adaptive_resolution
        self.confidence_thresholds = tuple(sorted(set(thresholds)))
        self.min_count, self.collapse_entropy = min_count, collapse_entropy
        self.plot_every_n_epochs = check_plot_every(plot_every_n_epochs)
        self.ignore_index = ignore_index
        if confusion not in CONFUSION_MODES:
            raise ValueError(f"Expected `confusion` to be one of {list(CONFUSION_MODES)}, but got {confusion!r}")
        check_positive_int("top_confusions", top_confusions)
        if max_memory_gb is not None and (isinstance(max_memory_gb, bool) or not isinstance(max_memory_gb, (int, float))
                                          or not max_memory_gb > 0):
            raise ValueError(f"Expected `max_memory_gb` to be None (its share of the probes' memory budget) or a "
                             f"positive number of GB, but got {max_memory_gb!r}")
        self.confusion, self.top_confusions = confusion, top_confusions
        self.max_memory_gb = None if max_memory_gb is None else float(max_memory_gb)
        self._share: Optional[int] = None
        self._sparse: Optional[bool] = None  # decided at the first batch of a run (the number of classes)
        self._warned_pairs = False
        self._states: dict[tuple[str, int], ConfidenceState] = {}
        #: The latest results per ``<stage>`` (or ``<stage>/dataloader_idx_<i>`` with several loaders).
        self.last_results: dict[str, dict[str, Any]] = {}

    def layout(self) -> dict[str, list[Any]]:
        """Custom-scalars charts by theme (calibration, accuracy, collapse, ...), each with every stage, data
        loader and metric of the theme as lines (the scalars are per stage, not per layer)."""
        name = re.escape(self.name)
        return {chart: ["Multiline", [rf"^{name}/[^/]+/({'|'.join(stats)})(/|$)"]] for chart, stats in _LAYOUT.items()}

    # -- contract -----------------------------------------------------------------------------------
    def _read(self, stage: str, outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(M, C)`` and targets ``(M,)`` (or one-hot ``(M, C)``) of one step output; shape checks only."""
        if not isinstance(outputs, Mapping) or self.logits_key not in outputs or self.target_key not in outputs:
            found = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise MissingOutputError(
                f"ConfidenceMonitor needs `{self.logits_key}` and `{self.target_key}` in the dict returned by "
                f"`{stage}_step`, but found {found}. Return them (see the class docstring) or set "
                "`logits_key` / `target_key`.")
        logits, target = outputs[self.logits_key], outputs[self.target_key]
        for key, value in ((self.logits_key, logits), (self.target_key, target)):
            if not isinstance(value, torch.Tensor):
                raise ProbeConfigurationError(f"ConfidenceMonitor expects `{key}` returned by `{stage}_step` to be a "
                                              f"tensor, but got {type(value).__name__}")
        if logits.ndim < 1:
            raise ProbeConfigurationError(
                f"ConfidenceMonitor expects `{self.logits_key}` returned by `{stage}_step` of shape (N, C), "
                f"(N, C, d1, ...) to score every position (e.g. segmentation), or (N,) / (N, 1) for a one-logit "
                f"binary classifier, but got shape {tuple(logits.shape)}")
        if logits.ndim == 1 or logits.shape[1] == 1:
            logits, target = self._binary(stage, logits, target)
        index_shape = (logits.shape[0], *logits.shape[2:])
        if target.shape != logits.shape:
            if tuple(target.shape) != index_shape:
                raise ProbeConfigurationError(
                    f"ConfidenceMonitor expects `{self.target_key}` returned by `{stage}_step` of shape {index_shape} "
                    f"(class indices) or {tuple(logits.shape)} (one-hot) to match `{self.logits_key}` of shape "
                    f"{tuple(logits.shape)}, but got shape {tuple(target.shape)}")
            if target.is_floating_point() or target.is_complex():
                raise ProbeConfigurationError(f"ConfidenceMonitor expects `{self.target_key}` returned by "
                                              f"`{stage}_step` to hold class indices of an integer dtype, but got "
                                              f"{target.dtype}")
        return flatten_class_dim(logits.detach(), target.detach())

    def _binary(self, stage: str, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One logit ``z`` per sample (or position) as the two-class logits ``[0, z]`` (their softmax is
        ``[1 - sigmoid(z), sigmoid(z)]``), and the targets as class indices ``{0, 1}`` (integer targets) or as
        one-hot rows ``[1 - t, t]`` (floating targets, so that values other than 0 and 1 count as soft labels)."""
        z = logits.unsqueeze(1) if logits.ndim == 1 else logits  # (N, 1, ...)
        index_shape = (z.shape[0], *z.shape[2:])
        if target.shape == z.shape and target.ndim > 1:
            target = target.squeeze(1)
        if tuple(target.shape) != index_shape:
            raise ProbeConfigurationError(
                f"ConfidenceMonitor expects `{self.target_key}` returned by `{stage}_step` of shape {index_shape} "
                f"(binary labels 0/1) to match the one-logit `{self.logits_key}` of shape {tuple(logits.shape)}, but "
                f"got shape {tuple(target.shape)}")
        if target.is_floating_point():
            if self.ignore_index is not None:
                raise ProbeConfigurationError(
                    f"ConfidenceMonitor: `{self.target_key}` returned by `{stage}_step` holds floating binary labels, "
                    f"but `ignore_index={self.ignore_index}` needs integer targets; return `target.long()`")
            target = torch.stack([1 - target, target], dim=1)  # (N, 2, ...): one-hot when t is 0 or 1
        return torch.cat([torch.zeros_like(z), z], dim=1), target

    def _check_values(self, stage: str, target: torch.Tensor, num_classes: int) -> None:
        """Check the target values of one batch on the host (one synchronisation: first batches only)."""
        soft = 0
        if target.ndim == 2:
            target, one_hot = one_hot_to_index(target)
            soft = int((~one_hot).sum())
        target = target.long()
        if self.ignore_index is not None:
            target = target[target != self.ignore_index]
        low, high = (int(target.min()), int(target.max())) if target.numel() else (0, 0)
        self._raise_for_targets(stage, low, high, soft, num_classes)

    def _raise_for_targets(self, stage: str, low: int, high: int, soft: int, num_classes: int) -> None:
        problem = _target_problem(low, high, soft, num_classes)
        if problem is not None:
            raise ValueError(f"ConfidenceMonitor: `{self.target_key}` returned by `{stage}_step` {problem}")

    # -- memory -------------------------------------------------------------------------------------
    def reset_run(self) -> None:
        super().reset_run()
        self._share, self._sparse, self._warned_pairs = None, None, False

    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        """Take this probe's memory share (the confusion state is planned inside it once the first batch gives
        the number of classes)."""
        self._share = self.memory_share(trainer, pl_module)
        return None

    def _plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, num_classes: int) -> bool:
        """Whether the states of this run are sparse: ``confusion``, or for ``"auto"`` whether the dense state
        and its record fit this probe's share; logs the plan once."""
        share = self._share if self._share is not None else self.memory_share(trainer, pl_module)
        dense = dense_bytes(num_classes, len(self.confidence_thresholds))
        sparse = self.confusion == "sparse" or (self.confusion == "auto" and dense > share)
        reduced = None
        if sparse:
            why = "as set" if self.confusion == "sparse" else f"{format_bytes(dense)} with its record"
            reduced = (f"sparse confusion of the {num_classes} classes (per-class counts and the (target, predicted) "
                       f"cells seen, 24 bytes each; the record lists the {self.top_confusions} most frequent "
                       f"confusions) instead of the dense matrices ({why})")
        planned = sparse_bytes(num_classes) if sparse else dense
        self.report_memory_plan(trainer, pl_module, planned, reduced)
        return sparse

    def _check_pairs(self, state: ConfidenceState) -> None:
        """Warn once when a sparse confusion has outgrown the share (it holds every cell seen: exact)."""
        share = self._share or FLOOR_BYTES
        if not self._warned_pairs and state.pair_rows() * 24 > share:
            self._warned_pairs = True
            rank_zero_warn(f"ConfidenceMonitor {self.name!r}: its sparse confusion holds {state.pair_rows()} rows "
                           f"({format_bytes(state.pair_rows() * 24)}), more than its memory share "
                           f"({format_bytes(share)}): the (target, predicted) cells seen are kept exactly; "
                           "validate on fewer batches or raise `max_memory_gb` if memory is short")

    # -- accumulation -------------------------------------------------------------------------------
    def _new_state(self, num_classes: int, device: torch.device) -> ConfidenceState:
        state = ConfidenceState(num_classes, self.n_bins, self.confidence_thresholds, self.adaptive_resolution,
                                self.ignore_index, sparse=bool(self._sparse))
        return state.to(device)

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, outputs: Any, batch_idx: int,
                dataloader_idx: int) -> None:
        logits, target = self._read(stage, outputs)  # (M, C), (M,) or (M, C)
        num_classes = logits.shape[1]
        key = (stage, dataloader_idx)
        state = self._states.get(key)
        if state is not None and state.num_classes != num_classes:
            raise ValueError(f"ConfidenceMonitor: `{self.logits_key}` returned by `{stage}_step` has {num_classes} "
                             f"classes in batch {batch_idx}, but {state.num_classes} in earlier batches")
        if trainer.sanity_checking or batch_idx == 0:
            self._check_values(stage, target, num_classes)
        if self._sparse is None:
            self._sparse = self._plan(trainer, pl_module, num_classes)
        if trainer.sanity_checking:
            return  # contract checked; sanity-check batches belong to no epoch
        if state is None:
            state = self._states[key] = self._new_state(num_classes, logits.device)
        elif state.device != logits.device:
            state.to(logits.device)
        state.update(logits, target)
        if state.sparse:
            self._check_pairs(state)

    def _reset(self, stage: str) -> None:
        for (state_stage, _), state in self._states.items():
            if state_stage == stage:
                state.reset()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset("val")  # an interrupted epoch leaves nothing behind

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset("test")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(trainer, pl_module, "val", outputs, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(trainer, pl_module, "test", outputs, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:  # before `on_validation_end`, where EarlyStopping reads the metrics
            self._finish(trainer, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for label, results in self._finish(trainer, "test"):
            title = "ConfidenceMonitor" if self.name == self.probe_name else f"ConfidenceMonitor {self.name}"
            rank_zero_info(format_table(results, f"{title} ({label})"))

    # -- results ------------------------------------------------------------------------------------
    @staticmethod
    def _num_loaders(trainer: pl.Trainer, stage: str) -> int:
        try:
            return len(trainer.num_test_batches if stage == "test" else trainer.num_val_batches)
        except (AttributeError, TypeError):  # a Trainer that is not running this stage
            return 1

    def _finish(self, trainer: pl.Trainer, stage: str) -> list[tuple[str, dict[str, Any]]]:
        """Compute, report and reset every data loader's sums of ``stage``; ``[(label, results), ...]``."""
        keys = sorted(k for k in self._states if k[0] == stage)
        several = len(keys) > 1 or self._num_loaders(trainer, stage) > 1
        finished = []
        for key in keys:
            state = self._states[key]
            computed = {k: v.cpu() for k, v in state.compute().items()}  # every rank: torchmetrics sums the states
            state.reset()
            self._raise_for_targets(stage, int(computed["target_min"]), int(computed["target_max"]),
                                    int(computed["soft_targets"]), state.num_classes)
            results = summarize(computed, self.confidence_thresholds, self.top_confusions)
            suffix = f"/dataloader_idx_{key[1]}" if several else ""
            label = f"{stage}{suffix}"
            self.last_results[label] = results
            finished.append((label, results))
            if results["prediction_entropy_normalized"] < self.collapse_entropy:
                rank_zero_warn(f"ConfidenceMonitor: predictions collapsed in {label} epoch {trainer.current_epoch}: "
                               f"normalised entropy {results['prediction_entropy_normalized']:.3f} < "
                               f"{self.collapse_entropy}, most-predicted class holds {results['top_class_share']:.1%}.")
            self.publish(trainer, {f"{self.name}/{stage}/{m}{suffix}": results[m] for m in HEADLINE_METRICS})
            if not trainer.is_global_zero:
                continue
            record = {"epoch": trainer.current_epoch, "step": trainer.global_step, "stage": stage,
                      "dataloader_idx": key[1], **results}
            self.write_records(trainer, [record])
            keys_logged = [k for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            loader = {"loader": suffix[1:] or None}
            self.log_scalars(trainer, self.scalars([{**results, **loader}], keys_logged, layer_key="loader",
                                                   prefix=f"{stage}/"), trainer.global_step)
            self._plot(trainer, stage, results, suffix)
        return finished

    def _plot(self, trainer: pl.Trainer, stage: str, results: dict[str, Any], suffix: str = "") -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        if "confusion_matrix" in results:  # a sparse record has no matrix to show
            counts = np.asarray(results["confusion_matrix"], dtype=float)
            with np.errstate(invalid="ignore"):
                normalised = counts / counts.sum(axis=1, keepdims=True)
            self.log_image(trainer, colormapped(normalised, 0, 1), f"{stage}/heatmap/confusion{suffix}", step)
        for filename, tag, draw in stage_figures(results, stage, suffix, epoch, self.min_count):
            if stage == "test":
                self.save_figure(trainer, draw(), filename, tag, step)
            else:
                self.figure(trainer, filename, tag, step, draw, epoch + 1)

    @classmethod
    def figures_from_files(cls, directory: str, name: str, settings: Mapping[str, Any]) -> list[FigureSpec]:
        """The figures of the last record of every stage and data loader in the JSONL."""
        records = cls.records_of(directory, name)
        min_count = int(settings.get("min_count", 5))
        specs: list[FigureSpec] = []
        for stage in ("val", "test"):
            mine = [r for r in records if r.get("stage") == stage]
            loaders = sorted({int(r.get("dataloader_idx", 0)) for r in mine})
            several = len(loaders) > 1 or any(loaders)
            for loader in loaders:
                last = [r for r in mine if int(r.get("dataloader_idx", 0)) == loader][-1]
                suffix = f"/dataloader_idx_{loader}" if several else ""
                specs += stage_figures(last, stage, suffix, last["epoch"], min_count)
        return specs
