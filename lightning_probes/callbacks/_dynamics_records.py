"""`GradientDynamicsMonitor`'s records, made on the host from a logged step's combined block (at the flush): the
record columns, the EMAs and epoch sums that follow them in step order, and the sign-map row."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from lightning_probes.callbacks._dynamics_step import INTEGER_KEYS, initial_columns, ratio_columns, record_columns
from lightning_probes.functional.dynamics import COUNT_NAMES
from lightning_probes.naming import TOTAL

_FRACTIONS = ("zero_fraction", "released_fraction", "retained_fraction", "sign_flip_fraction")
#: The ``__total__`` statistics averaged over an epoch's logged steps (the headline metrics).
EPOCH_MEANS = (*_FRACTIONS, "update_norm")


class DynamicsRecords:
    """Mixin of `GradientDynamicsMonitor`: its records from combined blocks, its EMAs, epoch sums and sign-map row.

    It uses the probe's ``_names``, ``_selected_counts``, ``_ema``, ``_epoch_sums``, ``_latest_row``,
    ``_n_columns``, ``ema_decay``, ``_warned_nonfinite``, ``_selection_for`` and the `ProbeCallback` output methods.
    """

    def _records(self, trainer: pl.Trainer, tracked: list[int], has_previous: bool, base: dict[str, Any],
                 device: torch.device, log_scalars: bool, packed: torch.Tensor) -> list[dict[str, Any]]:
        """The records of a logged step from its combined block (on the host), when the buffer is written."""
        n_layers = len(tracked)
        packed = packed.numpy()
        sections = np.cumsum([n_layers * len(COUNT_NAMES), *[n_layers] * 6, 2])
        counts, grad_norm, update_norm, weight_norm, followed, initial, initial_ref, flags, sample = np.split(
            packed, sections)
        grad_norm, update_norm, weight_norm = np.sqrt(grad_norm), np.sqrt(update_norm), np.sqrt(weight_norm)
        finite, previous_finite = flags[0] == 0, flags[1] == 0
        skipped = base["skipped"]
        if not finite and not self._warned_nonfinite:
            self._warned_nonfinite = True
            rank_zero_warn(f"GradientDynamicsMonitor {self.name!r}: non-finite gradients at step {base['step']}"
                           f"{' (step skipped by the AMP GradScaler)' if skipped else ''}; warned once.")
        self._store_sample(tracked, sample, device)
        sizes = [self._selected_counts[i] for i in tracked]
        comparable = has_previous and previous_finite and finite and not skipped
        columns = record_columns(counts, sizes, grad_norm, update_norm, weight_norm, comparable, skipped)
        columns.update(ratio_columns(update_norm ** 2, followed, sizes, skipped))
        if self.init_distance:
            columns.update(initial_columns(initial, initial_ref))
        names = [self._names[i] for i in tracked] + [TOTAL]
        base = {**base, "has_previous": comparable}
        keys = list(columns)
        rows = np.stack([np.asarray(columns[k], dtype=float) for k in keys], axis=1).tolist()
        records = []
        for name, row in zip(names, rows):
            record = {**base, "layer": name}
            for key, value in zip(keys, row):
                record[key] = None if value != value else (int(value) if key in INTEGER_KEYS else value)
            self._update_ema(name, record)
            records.append(record)
        self._accumulate_epoch(records[-1])
        if log_scalars:
            logged = [k for k in keys if k != "sampled_entries"]  # a constant: in the JSONL only
            self.log_scalars(trainer, self.scalars(records, (*logged, "grad_norm_ema", "weight_norm_ema")),
                             base["step"])
        return records

    def _update_ema(self, name: str, record: dict[str, Any]) -> None:
        ema = self._ema.setdefault(name, {})
        for key in ("grad_norm", "weight_norm"):
            value = record[key]
            if value is not None:
                ema[key] = value if key not in ema else self.ema_decay * ema[key] + (1 - self.ema_decay) * value
            record[f"{key}_ema"] = ema.get(key)

    def _accumulate_epoch(self, total: dict[str, Any]) -> None:
        for key in EPOCH_MEANS:
            if total.get(key) is not None:
                acc = self._epoch_sums.setdefault(key, [0.0, 0])
                acc[0] += total[key]
                acc[1] += 1

    def _store_sample(self, tracked: list[int], sample: np.ndarray, device: torch.device) -> None:
        """Put a logged step's sign-map columns into the latest row (the epoch's row at its end)."""
        if self._latest_row is None:
            self._latest_row = np.full(self._n_columns, np.nan)
        self._latest_row[self._selection_for(tracked, device).row] = sample
