"""`GradientStatsMonitor`: per-layer gradient statistics and first-vs-last gradient flow."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from lightning_probes.callbacks._gradient_figures import flow_figure, flow_specs
from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS, FigureSpec, check_positive_int
from lightning_probes.callbacks.parameter_probe import ParameterProbe
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.functional import _native
from lightning_probes.functional._fused import FusedKernel, fused_abs_summary
from lightning_probes.functional.gradients import (
    nonfinite_counts,
    norm_summary,
    partial_summary,
    stats_from_summary,
    summary_from_partials,
    total_summary,
)
from lightning_probes.naming import TOTAL, Patterns
from lightning_probes.sharding import all_reduce_max, all_reduce_sum, local_tensor

log = logging.getLogger(__name__)


class GradientStatsMonitor(ParameterProbe):
    """Logs ``grad_abs_mean``, ``grad_abs_std``, ``grad_norm``, ``grad_abs_max`` and ``nonfinite`` per parameter.

    Gradients are read in ``on_before_optimizer_step``: accumulated over micro-batches, unscaled under AMP,
    not yet clipped. Every ``every_n_steps`` optimiser steps it writes one record per parameter tensor and one
    ``__total__`` record (global norm over all tracked entries) to ``gradient_stats.jsonl``, and logs the same
    values as ``gradient_stats/<stat>/<layer>``. ``grad_abs_std`` is the population standard deviation of
    ``|g|``. All statistics are computed on the device; a logged step costs one device-to-host transfer.
    Under AMP with an optimizer that unscales inside its own ``step`` (fused Adam), the gradients reach the hook
    still multiplied by the loss scale: the statistics are divided by it (`loss_scale_inverse`).

    Under FSDP2 (sharded ``DTensor`` parameters) the records are those of the full tensors: every rank sums
    ``|g|`` and ``g**2`` and takes ``max |g|`` over its local shard, and two all-reduces (one sum of a stacked
    tensor, one max) per step the probe reads gradients combine them; the mean, std (from the sums, in float64)
    and norm follow. Histograms need the full gradients and are refused there.

    It also accumulates the mean and std of ``|g|`` per layer, pooled over all entries of the first ``window``
    optimiser steps of training and of the last ``window`` steps of the final epoch, and at the end of fit
    writes them to ``<name>/gradient_flow.json`` and draws them as ``<name>/gradient_flow.png`` (and a
    TensorBoard image ``<name>/gradient_flow``). Where the epoch's length is unknown (an iterable dataset without
    ``limit_train_batches``), every step of the epoch is summarised into a ring of the last ``window`` steps (per
    optimiser, on the device, no host synchronisation), which gives the last window at the epoch's end.

    Headline metrics for ``EarlyStopping``/``ModelCheckpoint`` (``trainer.callback_metrics``, at every train
    epoch end, on every rank): ``<name>/nonfinite_epoch``, the non-finite gradient entries seen on the logged
    steps of the epoch (0 when none), and ``<name>/grad_norm/__total__``, the global gradient norm of the last
    logged step (left out while it is non-finite).

    State (window sums, the headline values) is allocated at the first step that needs it, on the device and
    in the dtype of the gradients met there, so the strategy may move or convert the module after ``setup``;
    restored (CPU) state moves to the gradients' device at its first use.

    Args:
        every_n_steps: Log at every n-th optimiser step (of each optimiser).
        window: Number of optimiser steps in the first and last gradient-flow windows.
        histogram_every_n_steps: Also send gradient histograms (tags ``<name>/histogram/<layer>``) to loggers
            that support them (TensorBoard) every n steps; ``None`` disables them. Each histogram copies the
            gradient to the host.
        include: Regular expression(s); only parameters whose name matches one are tracked.
        exclude: Regular expression(s); parameters whose name matches one are not tracked.
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default ``gradient_stats``.
        compile: Compute the per-tensor sums, norms and maxima as one ``torch.compile``'d pass per tensor
            (float32 or float64 gradients) instead of the C loop of `lightning_probes.functional._native` (one
            pass per tensor, on a CPU with a C compiler) or four eager passes (elsewhere). The first step pays
            the compilation once (seconds; see `compile_seconds`); where compiling is unavailable or fails, it
            runs eagerly (logged once). The statistics agree with the eager ones to float rounding. ``"auto"``
            (default): compile when the fit will log at least 5,000 steps (``estimated_stepping_batches /
            every_n_steps``) and ``torch.compile`` can build kernels here, where it pays for the seconds it takes.
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: After the run started, ``"warn"`` (default) turns an exception inside the probe into one warning,
            a ``{"disabled": true}`` record and a disabled probe while training goes on; ``"raise"`` re-raises.
            ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"`` (see `lightning_probes.callbacks.guard`).

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[GradientStatsMonitor(every_n_steps=10)])
    """

    probe_name = "gradient_stats"
    layout_stats = ("grad_abs_mean", "grad_abs_std", "grad_norm", "grad_abs_max", "nonfinite")

    def __init__(
        self,
        every_n_steps: int = 50,
        window: int = 5,
        histogram_every_n_steps: Optional[int] = None,
        include: Patterns = None,
        exclude: Patterns = None,
        output_dir: Optional[str] = None,
        name: Optional[str] = None,
        compile: Union[bool, Literal["auto"]] = "auto",
        flush_every_n_steps: Optional[int] = None,
        flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
        on_error: Optional[str] = None,
    ) -> None:
        super().__init__(every_n_steps, include, exclude, output_dir, name,
                         flush_every_n_steps=flush_every_n_steps, flush_secs=flush_secs, on_error=on_error)
        check_positive_int("window", window)
        check_positive_int("histogram_every_n_steps", histogram_every_n_steps, allow_none=True)
        self.window = window
        self.histogram_every_n_steps = histogram_every_n_steps
        # Per tracked parameter: [sum |g|, sum g^2, entries] over the window's finite steps.
        self._first_window: Optional[torch.Tensor] = None
        self._last_window: Optional[torch.Tensor] = None
        # Per (tracked indices, device): the index and entry-count tensors of `_accumulate_windows`.
        self._window_index: dict[tuple[tuple[int, ...], torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        # Epochs of unknown length (an iterable dataset): per optimizer, the rows of its last `window` steps.
        self._rings: dict[int, torch.Tensor] = {}
        self._batch_idx = 0
        self._warned_nonfinite = False
        # Headline metrics (global rank 0), see `on_train_epoch_end`: (epoch, non-finite entries counted in it).
        self._nonfinite_count: tuple[int, int] = (-1, 0)
        self._last_total_norm: Optional[float] = None
        self._owned: dict[tuple[tuple[int, ...], torch.device], Optional[torch.Tensor]] = {}
        if compile not in (True, False, "auto"):
            raise ValueError(f"Expected `compile` to be True, False or 'auto', but got {compile!r}")
        self.compile = compile
        self._kernel = FusedKernel(fused_abs_summary, enabled=self.compile is True,
                                   name=f"{type(self).__name__} summary")

    def _kernels(self) -> list[FusedKernel]:
        return [self._kernel]

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in the first (compiling) calls of the compiled kernel; 0 when running eagerly."""
        return self._kernel.compile_seconds

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for key in ("_first_window", "_last_window"):
            value = getattr(self, key)
            state[key.lstrip("_")] = None if value is None else value.detach().cpu()
        state["nonfinite_count"] = list(self._nonfinite_count)
        state["last_total_norm"] = self._last_total_norm
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._first_window = state_dict.get("first_window")  # CPU tensors: moved at their first use
        self._last_window = state_dict.get("last_window")
        epoch, count = state_dict.get("nonfinite_count", (-1, 0))
        self._nonfinite_count = (int(epoch), int(count))
        self._last_total_norm = state_dict.get("last_total_norm")

    def reset_run(self) -> None:
        """Forget the previous run: windows, headline values, caches (a resumed fit restores its state after)."""
        super().reset_run()
        self._first_window = self._last_window = None
        self._window_index, self._owned, self._rings = {}, {}, {}
        self._batch_idx = 0
        self._warned_nonfinite = False
        self._nonfinite_count = (-1, 0)
        self._last_total_norm = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._may_shard and self.histogram_every_n_steps is not None:
            raise ProbeConfigurationError(
                f"{type(self).__name__} cannot send gradient histograms under {type(trainer.strategy).__name__}: a "
                f"histogram needs the full gradient, and the parameters may be sharded. Set "
                f"`histogram_every_n_steps=None` (got {self.histogram_every_n_steps}).")

    def _select(self, pl_module: pl.LightningModule, trainable: Optional[set[str]] = None) -> None:
        super()._select(pl_module, trainable)
        self._window_index = {}
        self._owned = {}
        self._rings = {}

    def _windows_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The first/last window sums, ``(P, 3)`` float64 on ``device``: allocated at the first use, restored
        state moved there, state of another parameter selection discarded."""
        for key in ("_first_window", "_last_window"):
            value = getattr(self, key)
            if value is None or value.shape != (len(self._params), 3):
                value = torch.zeros(len(self._params), 3, dtype=torch.float64, device=device)
            elif value.device != device or value.dtype != torch.float64:
                value = value.to(device=device, dtype=torch.float64)
            else:
                continue
            setattr(self, key, value)
        return self._first_window, self._last_window

    # -- hooks --------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_window is not None and self._steps_left_in_epoch(trainer, 0) >= self.window:
            self._last_window.zero_()  # a fresh epoch (not a mid-epoch resume) starts a fresh last window
        self._rings = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def _steps_left_in_epoch(self, trainer: pl.Trainer, batch_idx: int) -> float:
        """Optimiser steps that remain in this epoch after the one at ``batch_idx`` (inf when unknown)."""
        accumulate = max(1, trainer.accumulate_grad_batches)
        left = math.inf
        if isinstance(trainer.num_training_batches, int):
            per_epoch = math.ceil(trainer.num_training_batches / accumulate)
            left = per_epoch - 1 - batch_idx // accumulate
        if trainer.max_steps and trainer.max_steps > 0:
            # Several optimizers (manual optimisation) step in turn, and `global_step` counts every one of their steps.
            left = min(left, (trainer.max_steps - 1 - trainer.global_step) // max(1, len(trainer.optimizers)))
        return left

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._ensure_layout(trainer, pl_module)
        if not self.computes(trainer):
            return
        opt_index, tracked = self._tracked_for(trainer, optimizer)
        count = self._next_step(opt_index)
        log_now = count % self.every_n_steps == 0
        in_first = count < self.window
        left = self._steps_left_in_epoch(trainer, self._batch_idx)
        in_last = left < self.window
        # The epoch's length is unknown (an iterable dataset): every step may be among its last `window`.
        ring = count % self.window if left == math.inf else None
        histogram = self.histogram_every_n_steps is not None and count % self.histogram_every_n_steps == 0
        if not (log_now or in_first or in_last or ring is not None or histogram):
            return
        tracked = [i for i in tracked if self._params[i].grad is not None]
        if not tracked:
            return
        grads = [local_tensor(self._params[i].grad) for i in tracked]  # this rank's shards under FSDP2
        sizes = [self._params[i].numel() for i in tracked]  # entries of the full tensors
        summary = self._summary(tracked, grads)  # (P, 3) on the device: sum|g|, ||g||_2, max|g|
        inverse = self.loss_scale_inverse(trainer, optimizer)
        if inverse is not None:  # still scaled by the AMP GradScaler (fused optimizer): every column is linear
            summary = summary.double() * inverse
        if in_first or in_last or ring is not None:
            self._accumulate_windows(tracked, sizes, summary, in_first, in_last, (opt_index, ring))
        if log_now:
            self._log_step(trainer, opt_index, tracked, grads, sizes, summary)
        if histogram:
            self._log_histograms(trainer, tracked, grads, inverse)

    def _summary(self, tracked: list[int], grads: list[torch.Tensor]) -> torch.Tensor:
        """`norm_summary` of the full tensors: of ``grads`` themselves (compiled when asked and all float32 or
        all float64), or under FSDP2 combined from every rank's `partial_summary` (two all-reduces)."""
        if self.sharded:
            partial = partial_summary(grads)  # (P, 3) float64 over the local shards
            owned = self._owned_rows(tracked, partial.device)
            if owned is not None:
                partial = partial * owned
            sums = all_reduce_sum(partial[:, :2].contiguous())
            maxima = all_reduce_max(partial[:, 2].contiguous())
            return summary_from_partials(sums, maxima)
        dtype = grads[0].dtype
        if (self._kernel.active and dtype in (torch.float32, torch.float64)
                and all(g.dtype == dtype for g in grads)):
            return self._kernel([g.detach() for g in grads])
        if _native.supports(grads) and _native.available():  # CPU: one C loop per tensor, float64 sums
            return _native.abs_summary(grads)
        return norm_summary(grads)

    def _owned_rows(self, tracked: list[int], device: torch.device) -> Optional[torch.Tensor]:
        """``(P, 1)`` 1/0 mask of the tensors whose partial sums this rank contributes (``None``: all of them)."""
        key = (tuple(tracked), device)
        if key not in self._owned:
            owners = [self._layouts[i].owner for i in tracked]
            self._owned[key] = None if all(owners) else torch.tensor(
                [[float(o)] for o in owners], dtype=torch.float64, device=device)
        return self._owned[key]

    def _accumulate_windows(self, tracked: list[int], sizes: list[int], summary: torch.Tensor,
                            in_first: bool, in_last: bool, ring: tuple[int, Optional[int]] = (0, None)) -> None:
        """Add a step's rows to the first/last windows, or (``ring``: ``(optimizer, slot)``, an epoch of unknown
        length) put them in slot ``slot`` of the optimizer's ring of its last ``window`` steps."""
        first, last = self._windows_on(summary.device)
        key = (tuple(tracked), summary.device)
        if key not in self._window_index:
            self._window_index[key] = (torch.tensor(tracked, device=summary.device),
                                       torch.tensor(sizes, dtype=torch.float64, device=summary.device))
        index, numel = self._window_index[key]
        rows = torch.stack([summary[:, 0].double(), summary[:, 1].double().square(), numel], dim=1)  # (P', 3)
        finite = torch.isfinite(rows).all(dim=1, keepdim=True)  # a non-finite step is left out, without a sync
        rows = torch.where(finite, rows, torch.zeros_like(rows))
        if in_first:
            first.index_add_(0, index, rows)
        if in_last:
            last.index_add_(0, index, rows)
        optimizer, slot = ring
        if slot is not None:
            if optimizer not in self._rings:
                self._rings[optimizer] = torch.zeros(self.window, *first.shape, dtype=first.dtype, device=first.device)
            self._rings[optimizer][slot].zero_().index_add_(0, index, rows)

    def _fold_rings(self) -> None:
        """An epoch of unknown length: its last window is what the rings hold (the last ``window`` steps of each
        optimizer)."""
        if self._rings and self._last_window is not None:
            self._last_window.copy_(sum(r.sum(dim=0) for r in self._rings.values()))

    def _log_step(self, trainer: pl.Trainer, opt_index: int, tracked: list[int], grads: list[torch.Tensor],
                  sizes: list[int], summary: torch.Tensor) -> None:
        summary = torch.cat([summary.double(), total_summary(summary)]).cpu()  # the one transfer
        numel = torch.tensor([*sizes, sum(sizes)])
        stats = stats_from_summary(summary, numel)
        nonfinite = torch.zeros(len(tracked) + 1, dtype=torch.int64)
        if not torch.isfinite(summary).all():  # the same on every rank under FSDP2: all of them count
            counts = nonfinite_counts(grads)
            if self.sharded:
                owned = self._owned_rows(tracked, counts.device)
                if owned is not None:
                    counts = counts * owned[:, 0].long()
                counts = all_reduce_sum(counts)
            counts = counts.cpu()
            nonfinite = torch.cat([counts, counts.sum().view(1)])
            epoch, seen = self._nonfinite_count
            seen = seen if epoch == trainer.current_epoch else 0
            self._nonfinite_count = (trainer.current_epoch, seen + int(nonfinite[-1]))
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                rank_zero_warn(f"GradientStatsMonitor {self.name!r}: non-finite gradients at step "
                               f"{trainer.global_step} ({int(counts.sum())} entries); they are counted in "
                               f"`nonfinite` (warned once).")
        if not trainer.is_global_zero:
            return
        names = [self._names[i] for i in tracked] + [TOTAL]
        base = self._base_record(trainer, opt_index)
        keys = list(stats)
        columns = np.stack([stats[k].numpy() for k in keys], axis=1)  # (P + 1, stats)
        columns = np.where(np.isfinite(columns), columns, np.nan).tolist()
        counts = nonfinite.tolist()
        records = []
        for name, row, count in zip(names, columns, counts):
            record = {**base, "layer": name}
            record.update((k, None if v != v else v) for k, v in zip(keys, row))
            record["nonfinite"] = count
            records.append(record)
        self._last_total_norm = records[-1]["grad_norm"]
        self.write_records(trainer, records)
        if self.logger_due(trainer, trainer.global_step):
            self.log_scalars(trainer, self.scalars(records, (*keys, "nonfinite")), trainer.global_step)

    def _log_histograms(self, trainer: pl.Trainer, tracked: list[int], grads: list[torch.Tensor],
                        inverse: Optional[torch.Tensor]) -> None:
        for logger in trainer.loggers:
            add_histogram = getattr(getattr(logger, "experiment", None), "add_histogram", None)
            if callable(add_histogram):
                for i, grad in zip(tracked, grads):
                    values = grad.detach().float()
                    values = values * inverse.float() if inverse is not None else values
                    add_histogram(f"{self.name}/histogram/{self._names[i]}", values.cpu(), trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fold_rings()
        # Every rank calls `publish` (rank 0's values are broadcast): only rank 0 computes the statistics.
        epoch, seen = self._nonfinite_count
        metrics = {f"{self.name}/nonfinite_epoch": seen if epoch == trainer.current_epoch else 0,
                   f"{self.name}/grad_norm/{TOTAL}": self._last_total_norm}
        self.publish(trainer, metrics, from_rank_zero=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._first_window is None:
            return
        self._fold_rings()
        windows = {}
        for label, acc in (("first", self._first_window), ("last", self._last_window)):
            acc = acc.cpu()
            count = acc[:, 2].clamp_min(1)
            mean = acc[:, 0] / count
            std = (acc[:, 1] / count - mean.square()).clamp_min(0).sqrt()
            seen = acc[:, 2] > 0
            windows[label] = {"mean": [float(m) if s else None for m, s in zip(mean, seen)],
                              "std": [float(v) if s else None for v, s in zip(std, seen)]}
        summary = {"window": self.window, "layers": self._names, **windows}
        self.save_json(trainer, summary, "gradient_flow.json")
        self.save_figure(trainer, flow_figure(summary), "gradient_flow.png", "gradient_flow", trainer.global_step)

    @classmethod
    def figures_from_files(cls, directory: str, name: str, settings: Mapping[str, Any]) -> list[FigureSpec]:
        """The gradient-flow figure, from ``<name>/gradient_flow.json``."""
        return flow_specs(directory, name)
