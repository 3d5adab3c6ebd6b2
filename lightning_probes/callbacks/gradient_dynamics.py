"""`GradientDynamicsMonitor`: near-zero gradients, their release, sign flips, crossings and update norms."""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from lightning_probes.callbacks.base import ParameterProbe, check_positive_int
from lightning_probes.functional.dynamics import (
    COUNT_NAMES,
    NUM_BINS,
    counts_from_histogram,
    encode_previous,
    transition_histogram,
    zero_threshold_for,
)
from lightning_probes.io import read_jsonl
from lightning_probes.naming import Patterns
from lightning_probes.plotting import line_panels, sign_map

log = logging.getLogger(__name__)

TOTAL = "__total__"
_INTEGER_KEYS = ("zero_count", "minima_crossings", "maxima_crossings")
_FRACTIONS = ("zero_fraction", "released_fraction", "retained_fraction", "sign_flip_fraction")


class GradientDynamicsMonitor(ParameterProbe):
    """Tracks how the optimiser moves: near-zero gradients, their release, sign flips and weight updates.

    At every ``every_n_steps``-th optimiser step ``t`` it compares the gradient with the one at step ``t-1``
    and writes, per parameter tensor and as ``__total__``, to ``gradient_dynamics.jsonl`` and the loggers
    (``gradient_dynamics/<stat>/<layer>``):

    - ``zero_count``, ``zero_fraction``: entries with ``|g| < zero_threshold``;
    - ``released_fraction`` / ``retained_fraction``: of the entries with ``|g| < release_threshold`` at
      ``t-1``, the share now at or above it / still below it;
    - ``sign_flip_fraction``: share of entries whose gradient sign changed (entries that are exactly zero at
      either step excluded);
    - ``minima_crossings`` / ``maxima_crossings``: flipped entries with ``dw * dg > 0`` / ``< 0``, where
      ``dw = w_t - w_{t-1}`` and ``dg = g_t - g_{t-1}``;
    - ``update_norm`` (``||w_after - w_before||`` of step ``t``), ``weight_norm`` (after the step),
      ``grad_norm``, and their exponential moving averages ``*_ema`` (over logged steps, ``ema_decay``).

    A record of a step the AMP GradScaler skipped (non-finite gradients) has ``skipped: true`` and no flip,
    release or update statistics; the next step then has no previous gradient (``has_previous: false``), as
    does the first step after a restart. Between steps it keeps one byte per tracked entry (an ``int8``
    sign-direction-and-threshold code, see `lightning_probes.functional.dynamics`), and only for the step before
    a logged one;
    a weight copy exists only during the steps it compares. A logged step costs one device-to-host transfer.

    At every epoch end it adds a row to a gradient-sign map (columns: gradient entries from the first to the
    last layer, deterministically subsampled to ``max_columns``): white where ``|g| > release_threshold``, red
    for small negative, green for small positive, black for exact zeros. It is drawn whole and zoomed on
    ``zoom_columns`` to ``gradient_sign_map.png`` / ``gradient_sign_map_zoom.png`` and TensorBoard. At the end
    of fit it plots zero counts, released fraction, flip fraction and update norm over training
    (``gradient_dynamics.png``).

    Args:
        every_n_steps: Log at every n-th optimiser step (of each optimiser).
        zero_threshold: Magnitude below which a gradient entry counts as zero. Dtype-aware: for bf16/fp16
            gradients it is raised to the dtype's smallest normal number when lower.
        release_threshold: Magnitude below which an entry is "near zero" for release/retention and the sign map.
        ema_decay: Decay of the exponential moving averages, in [0, 1).
        max_columns: Most gradient entries shown in the sign map.
        zoom_columns: ``(start, stop)`` column range of the zoomed sign map.
        include: Regular expression(s); only parameters whose name matches one are tracked.
        exclude: Regular expression(s); parameters whose name matches one are not tracked.
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[GradientDynamicsMonitor(every_n_steps=10)])
    """

    probe_name = "gradient_dynamics"

    def __init__(
        self,
        every_n_steps: int = 50,
        zero_threshold: float = 1e-7,
        release_threshold: float = 1e-5,
        ema_decay: float = 0.9,
        max_columns: int = 2000,
        zoom_columns: tuple[int, int] = (0, 200),
        include: Patterns = None,
        exclude: Patterns = None,
        output_dir: Optional[str] = None,
    ) -> None:
        super().__init__(every_n_steps, include, exclude, output_dir)
        for name, value in (("zero_threshold", zero_threshold), ("release_threshold", release_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Expected `{name}` to be a positive float, but got {value!r}")
        if zero_threshold > release_threshold:
            raise ValueError(f"Expected `zero_threshold` <= `release_threshold`, but got {zero_threshold!r} > "
                             f"{release_threshold!r}")
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0 <= ema_decay < 1:
            raise ValueError(f"Expected `ema_decay` to be in [0, 1), but got {ema_decay!r}")
        check_positive_int("max_columns", max_columns)
        if (len(tuple(zoom_columns)) != 2 or not all(isinstance(c, int) for c in zoom_columns)
                or not 0 <= zoom_columns[0] < zoom_columns[1]):
            raise ValueError(
                f"Expected `zoom_columns` to be (start, stop) with 0 <= start < stop, but got {zoom_columns!r}")
        self.zero_threshold = float(zero_threshold)
        self.release_threshold = float(release_threshold)
        self.ema_decay = float(ema_decay)
        self.max_columns = max_columns
        self.zoom_columns = tuple(zoom_columns)
        self._previous: dict[int, dict[str, Any]] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        self._hooks: list[Any] = []
        self._ema: dict[str, dict[str, float]] = {}
        self._epoch_sums: dict[str, list[float]] = {}
        self._sign_rows: list[np.ndarray] = []
        self._sign_epochs: list[int] = []
        self._latest_row: Optional[np.ndarray] = None
        self._columns: list[torch.Tensor] = []
        self._column_offsets: list[int] = []
        self._warned_nonfinite = False

    def _state_config(self) -> dict[str, Any]:
        return {**super()._state_config(), "zero_threshold": self.zero_threshold,
                "release_threshold": self.release_threshold}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ema": self._ema, "sign_rows": [r.tolist() for r in self._sign_rows],
                "sign_epochs": list(self._sign_epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._ema = state_dict.get("ema", {})
        self._sign_rows = [np.asarray(r, dtype=np.int8) for r in state_dict.get("sign_rows", [])]
        self._sign_epochs = list(state_dict.get("sign_epochs", []))
        self._previous = {}  # the first step after a restore has no previous gradient

    # -- setup and teardown -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        sizes = [p.numel() for p in self._params]
        total = sum(sizes)
        picks = torch.unique(torch.linspace(0, total - 1, min(self.max_columns, total)).round().long())
        offsets = np.cumsum([0, *sizes])
        self._columns, self._column_offsets = [], []
        for i, param in enumerate(self._params):
            inside = picks[(picks >= offsets[i]) & (picks < offsets[i + 1])] - int(offsets[i])
            self._columns.append(inside.to(param.device))
            self._column_offsets.append(int(np.searchsorted(picks.numpy(), offsets[i])))
        self._n_columns = len(picks)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if trainer.is_global_zero:
            for optimizer in trainer.optimizers:
                self._hooks.append(optimizer.register_step_post_hook(functools.partial(self._after_step, trainer)))
        self._previous, self._pending = {}, {}

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
        self._pending, self._previous = {}, {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._pending, self._previous = {}, {}
        super().teardown(trainer, pl_module, stage)

    # -- the step -----------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not trainer.is_global_zero:
            return
        opt_index, tracked = self._tracked_for(trainer, optimizer)
        self._resolve_skipped(trainer, opt_index)
        count = self._next_step(opt_index)
        log_now = count % self.every_n_steps == 0
        snapshot = (count + 1) % self.every_n_steps == 0
        previous = self._previous.pop(opt_index, None)
        if not (log_now or snapshot):
            return
        tracked = [i for i in tracked if self._params[i].grad is not None]
        if not tracked:
            return
        params = [self._params[i] for i in tracked]
        grads = [p.grad.detach() for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # (N,) every tracked entry of this optimiser
        zero_threshold = zero_threshold_for(flat.dtype, self.zero_threshold)
        flat = flat.float()
        grad_norm = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))  # (P,)
        pending: dict[str, Any] = {"count": count, "tracked": tracked, "log": log_now, "snapshot": snapshot,
                                   "weights": [p.detach().clone() for p in params],
                                   "step": trainer.global_step, "epoch": trainer.current_epoch,
                                   "finite": torch.isfinite(grad_norm).all(), "grad_norm": grad_norm}
        if log_now:
            has_previous = previous is not None and previous["count"] == count - 1 and previous["tracked"] == tracked
            state = previous["state"] if has_previous else torch.zeros_like(flat, dtype=torch.int8)
            pending["histogram"] = transition_histogram(state, flat, zero_threshold, self.release_threshold,
                                                        [g.numel() for g in grads])  # (P, 126)
            pending["has_previous"] = has_previous
            pending["previous_finite"] = previous["finite"] if has_previous else pending["finite"]
            pending["sample"] = torch.cat([g.reshape(-1)[self._columns[i]].float() for i, g in zip(tracked, grads)])
        if snapshot:
            pending["flat"] = flat  # needed with the update to encode the state; freed after the step
        self._pending[opt_index] = pending

    def _after_step(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer post-step hook: the step happened (a GradScaler-skipped step never calls it)."""
        opt_index, _ = self._tracked_for(trainer, optimizer)
        pending = self._pending.pop(opt_index, None)
        if pending is None:
            return
        params = [self._params[i].detach() for i in pending["tracked"]]
        with torch.no_grad():
            deltas = torch._foreach_sub(params, pending.pop("weights"))
        if pending["snapshot"]:
            update = torch.cat([d.reshape(-1) for d in deltas])
            self._previous[opt_index] = {"state": encode_previous(pending.pop("flat"), update, self.release_threshold),
                                         "finite": pending["finite"], "count": pending["count"],
                                         "tracked": pending["tracked"]}
        if pending["log"]:
            pending["update_norm"] = torch.stack(torch._foreach_norm(deltas, 2, dtype=torch.float32))
            pending["weight_norm"] = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32))
            self._write(trainer, opt_index, pending, skipped=False)

    def _resolve_skipped(self, trainer: pl.Trainer, opt_index: Optional[int] = None) -> None:
        """A pending step whose post-step hook never ran was skipped (AMP found non-finite gradients)."""
        for index in [opt_index] if opt_index is not None else list(self._pending):
            pending = self._pending.pop(index, None)
            if pending is None:
                continue
            self._previous.pop(index, None)
            if pending["log"]:
                self._write(trainer, index, pending, skipped=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.is_global_zero:
            self._resolve_skipped(trainer)

    # -- records ------------------------------------------------------------------------------------
    def _write(self, trainer: pl.Trainer, opt_index: int, pending: dict[str, Any], skipped: bool) -> None:
        tracked = pending["tracked"]
        n_layers = len(tracked)
        device = pending["histogram"].device
        missing = torch.full((n_layers,), float("nan"), device=device)
        flags = torch.stack([pending["finite"], pending["previous_finite"]])
        packed = torch.cat([  # everything the records need, in one transfer
            pending["histogram"].double().reshape(-1),
            pending["grad_norm"].double(),
            pending.get("update_norm", missing).double(),
            pending.get("weight_norm", missing).double(),
            flags.double(),
            pending["sample"].double(),
        ]).cpu().numpy()
        sections = np.cumsum([n_layers * NUM_BINS, n_layers, n_layers, n_layers, 2])
        histogram, grad_norm, update_norm, weight_norm, flags, sample = np.split(packed, sections)
        finite, previous_finite = bool(flags[0]), bool(flags[1])
        if not finite and not self._warned_nonfinite:
            self._warned_nonfinite = True
            rank_zero_warn(f"GradientDynamicsMonitor: non-finite gradients at step {pending['step']}"
                           f"{' (step skipped by the AMP GradScaler)' if skipped else ''}; warned once.")
        self._store_sample(tracked, sample)
        counts = counts_from_histogram(histogram.reshape(n_layers, NUM_BINS).round().astype(np.int64))
        counts = np.vstack([counts, counts.sum(axis=0, keepdims=True)])  # (P + 1, 7), last row: all layers
        c = dict(zip(COUNT_NAMES, counts.T))
        sizes = np.array([self._params[i].numel() for i in tracked] + [0], dtype=float)
        sizes[-1] = sizes[:-1].sum()
        comparable = pending["has_previous"] and previous_finite and finite and not skipped
        with np.errstate(divide="ignore", invalid="ignore"):
            columns: dict[str, Any] = {"zero_count": c["zero"], "zero_fraction": c["zero"] / sizes}
            nan = np.full(n_layers + 1, np.nan)
            released = c["released"] / c["prev_below"] if comparable else nan
            columns["released_fraction"] = released
            columns["retained_fraction"] = 1.0 - released
            columns["sign_flip_fraction"] = c["flips"] / c["both_nonzero"] if comparable else nan
            columns["minima_crossings"] = c["minima"] if comparable else nan
            columns["maxima_crossings"] = c["maxima"] if comparable else nan
        for key, values in (("grad_norm", grad_norm), ("update_norm", nan[:-1] if skipped else update_norm),
                            ("weight_norm", weight_norm)):
            columns[key] = np.append(values, np.sqrt(np.sum(np.square(values))))
        names = [self._names[i] for i in tracked] + [TOTAL]
        base = self._base_record(trainer, opt_index)
        base.update(step=pending["step"], epoch=pending["epoch"], skipped=skipped, has_previous=comparable)
        keys = list(columns)
        rows = np.stack([np.asarray(columns[k], dtype=float) for k in keys], axis=1).tolist()
        records = []
        for name, row in zip(names, rows):
            record = {**base, "layer": name}
            for key, value in zip(keys, row):
                record[key] = None if value != value else (int(value) if key in _INTEGER_KEYS else value)
            self._update_ema(name, record)
            records.append(record)
        self._accumulate_epoch(records[-1])
        self.write_records(trainer, records)
        if self.logger_due(trainer, pending["step"]):
            self.log_scalars(trainer, {f"{self.probe_name}/{key}/{r['layer']}": r[key]
                                       for r in records for key in (*keys, "grad_norm_ema", "weight_norm_ema")},
                             pending["step"])

    def _update_ema(self, name: str, record: dict[str, Any]) -> None:
        ema = self._ema.setdefault(name, {})
        for key in ("grad_norm", "weight_norm"):
            value = record[key]
            if value is not None:
                ema[key] = value if key not in ema else self.ema_decay * ema[key] + (1 - self.ema_decay) * value
            record[f"{key}_ema"] = ema.get(key)

    def _accumulate_epoch(self, total: dict[str, Any]) -> None:
        for key in (*_FRACTIONS, "update_norm"):
            if total.get(key) is not None:
                acc = self._epoch_sums.setdefault(key, [0.0, 0])
                acc[0] += total[key]
                acc[1] += 1

    def _store_sample(self, tracked: list[int], sample: np.ndarray) -> None:
        if self._latest_row is None:
            self._latest_row = np.full(self._n_columns, np.nan)
        position = 0
        for i in tracked:
            n = len(self._columns[i])
            start = self._column_offsets[i]
            self._latest_row[start:start + n] = sample[position:position + n]
            position += n

    # -- epoch and fit end --------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_sums = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._resolve_skipped(trainer)
        means = {f"{self.probe_name}/epoch_mean_{k}/{TOTAL}": s / n for k, (s, n) in self._epoch_sums.items() if n}
        self.log_scalars(trainer, means, trainer.global_step)
        if self._latest_row is not None:
            row = self._latest_row
            categories = np.where(np.abs(row) > self.release_threshold, 0,
                                  np.where(row < 0, 1, np.where(row > 0, 2, 3))).astype(np.int8)
            self._sign_rows.append(categories)
            self._sign_epochs.append(trainer.current_epoch)
            self._draw_sign_maps(trainer)

    def _draw_sign_maps(self, trainer: pl.Trainer) -> None:
        rows = np.stack(self._sign_rows)
        title = f"Gradient-sign map, threshold {self.release_threshold:g}"
        self.save_figure(trainer, sign_map(rows, self._sign_epochs, title), "gradient_sign_map.png",
                         f"{self.probe_name}/sign_map", trainer.global_step)
        start, stop = self.zoom_columns
        stop = min(stop, rows.shape[1])
        if start < stop:
            fig = sign_map(rows, self._sign_epochs, title + f" (columns {start}-{stop})", (start, stop))
            self.save_figure(trainer, fig, "gradient_sign_map_zoom.png", f"{self.probe_name}/sign_map_zoom",
                             trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._writer is None:
            return
        self._writer.close()
        totals = [r for r in read_jsonl(self._writer.path) if r.get("layer") == TOTAL]
        if not totals:
            return
        series = {key: [np.nan if r.get(key) is None else r[key] for r in totals]
                  for key in ("zero_count", "released_fraction", "sign_flip_fraction", "update_norm")}
        fig = line_panels([r["step"] for r in totals], series, "optimiser step", "Gradient dynamics (all layers)")
        self.save_figure(trainer, fig, "gradient_dynamics.png", f"{self.probe_name}/over_training", trainer.global_step)
