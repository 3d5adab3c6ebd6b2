"""`ProbeCallback`: the output plumbing every probe shares (JSONL, loggers, figures, resume)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_probes.io import JsonlWriter, atomic_write_bytes, atomic_write_json, decode_png, render_png
from lightning_probes.naming import Patterns, clean_name, compile_patterns, name_filter

log = logging.getLogger(__name__)


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive ``int`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}")


def check_fraction(name: str, value: Any, low_open: bool = True, high_open: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` lies in the interval (0, 1) with the given openness."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"Expected `{name}` to be in {interval}, but got {value!r}")


class ProbeCallback(Callback):
    """Base class of every probe: owns ``<output_dir>/<probe_name>.jsonl`` and the logging helpers.

    Only global rank 0 writes files. Scalars go to every attached logger through ``log_metrics``; figures go
    to loggers whose ``experiment`` has ``add_figure`` (TensorBoard) and to PNG files.

    Args:
        output_dir: Directory for JSONL, JSON and PNG outputs. Default: ``<trainer.log_dir>/probes``, or
            ``<trainer.default_root_dir>/probes`` without a logger.
    """

    probe_name: str = "probe"

    def __init__(self, output_dir: Optional[str] = None) -> None:
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise ValueError(f"Expected `output_dir` to be a path or None, but got {output_dir!r}")
        self._output_dir_arg = None if output_dir is None else os.fspath(output_dir)
        self._output_dir: Optional[str] = None
        self._writer: Optional[JsonlWriter] = None
        self._resume_records: Optional[int] = None
        self._last_logger_step: Optional[int] = None

    # -- identity and state -------------------------------------------------------------------------
    def _state_config(self) -> Mapping[str, Any]:
        """Constructor arguments that distinguish two instances of the same probe (for ``state_key``)."""
        return {"output_dir": self._output_dir_arg}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._state_config())

    def state_dict(self) -> dict[str, Any]:
        records = self._writer.records_written if self._writer is not None else 0
        return {"records_written": records}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_records = state_dict.get("records_written")
        if self._writer is not None and self._resume_records is not None:
            self._writer.close()
            self._writer.keep_first(self._resume_records)

    # -- output -------------------------------------------------------------------------------------
    @property
    def output_dir(self) -> str:
        """Where this probe writes; resolved in ``setup``."""
        if self._output_dir is None:
            raise RuntimeError(f"{type(self).__name__}.output_dir is known only after `setup`")
        return self._output_dir

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._output_dir_arg is not None:
            self._output_dir = self._output_dir_arg
        else:
            base = trainer.log_dir if trainer.loggers and trainer.log_dir else trainer.default_root_dir
            self._output_dir = os.path.join(base, "probes")
        path = os.path.join(self._output_dir, f"{self.probe_name}.jsonl")
        if trainer.is_global_zero and (self._writer is None or self._writer.path != path):
            self._writer = JsonlWriter(path)
            if self._resume_records is not None:
                self._writer.keep_first(self._resume_records)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._writer is not None:
            self._writer.close()

    def path(self, filename: str) -> str:
        """Path of a file in the output directory."""
        return os.path.join(self.output_dir, filename)

    def write_records(self, trainer: pl.Trainer, records: Iterable[Mapping[str, Any]]) -> None:
        """Append records to the probe's JSONL (global rank 0 only)."""
        if trainer.is_global_zero and self._writer is not None:
            self._writer.write(records)

    def logger_due(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether per-step scalars of ``step`` go to the loggers: at most once per ``trainer.log_every_n_steps``
        optimiser steps (Lightning's own logging cadence); the JSONL still gets every logged step."""
        last = self._last_logger_step
        if last is not None and 0 <= step - last < max(1, trainer.log_every_n_steps):
            return False
        self._last_logger_step = step
        return True

    @staticmethod
    def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, Optional[float]], step: int) -> None:
        """Send finite scalars to every attached logger (loggers are rank-zero only by themselves)."""
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def save_figure(self, trainer: pl.Trainer, fig: Any, filename: str, tag: str, step: int) -> None:
        """Render a ``matplotlib.figure.Figure`` once; write it to ``<output_dir>/<filename>`` and to loggers
        whose ``experiment`` has ``add_image`` (TensorBoard). Global rank 0 only."""
        if not trainer.is_global_zero:
            return
        png = render_png(fig)
        atomic_write_bytes(self.path(filename), png)
        image = None
        for logger in trainer.loggers:
            add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
            if callable(add_image):
                if image is None:
                    image = decode_png(png)
                add_image(tag, image, global_step=step, dataformats="HWC")

    def save_json(self, trainer: pl.Trainer, obj: Any, filename: str) -> None:
        """Write a JSON summary atomically (global rank 0 only)."""
        if trainer.is_global_zero:
            atomic_write_json(self.path(filename), obj)


class ParameterProbe(ProbeCallback):
    """Base of probes that read parameters at optimiser steps (gradient statistics and dynamics).

    It selects the trainable parameters whose cleaned names pass ``include``/``exclude``, maps each optimiser
    to the tracked parameters it steps, and counts each optimiser's steps so that a probe logs at every
    ``every_n_steps``-th step of each optimiser (one optimiser: every ``every_n_steps``-th global step).

    Args:
        every_n_steps: Log at every n-th optimiser step.
        include: Regular expression(s); only parameters whose name matches one are tracked.
        exclude: Regular expression(s); parameters whose name matches one are not tracked.
        output_dir: Directory for the probe's files (see `ProbeCallback`).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        include: Patterns = None,
        exclude: Patterns = None,
        output_dir: Optional[str] = None,
    ) -> None:
        super().__init__(output_dir)
        check_positive_int("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self._include_arg, self._exclude_arg = include, exclude
        self._keep = name_filter(compile_patterns("include", include), compile_patterns("exclude", exclude))
        self._names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        self._by_optimizer: dict[int, tuple[int, list[int]]] = {}
        self._optimizer_steps: dict[int, int] = {}

    def _state_config(self) -> Mapping[str, Any]:
        return {"every_n_steps": self.every_n_steps, "include": self._include_arg, "exclude": self._exclude_arg,
                "output_dir": self._output_dir_arg}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "optimizer_steps": dict(self._optimizer_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._optimizer_steps = {int(k): int(v) for k, v in state_dict.get("optimizer_steps", {}).items()}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        named = [(clean_name(n), p) for n, p in pl_module.named_parameters() if p.requires_grad]
        selected = [(n, p) for n, p in named if self._keep(n)]
        if not selected:
            available = ", ".join(n for n, _ in named) or "none"
            raise ValueError(
                f"{type(self).__name__} found no trainable parameter matching include={self._include_arg!r}, "
                f"exclude={self._exclude_arg!r}. Trainable parameters: {available}")
        self._names = [n for n, _ in selected]
        self._params = [p for _, p in selected]
        self._by_optimizer = {}

    def _tracked_for(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> tuple[int, list[int]]:
        """``(optimizer index, indices of tracked parameters it steps)``, cached per optimizer."""
        key = id(optimizer)
        if key not in self._by_optimizer:
            index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._by_optimizer[key] = (index, [i for i, p in enumerate(self._params) if id(p) in owned])
        return self._by_optimizer[key]

    def _next_step(self, optimizer_index: int) -> int:
        """This optimiser's step count before this step; advances the count."""
        count = self._optimizer_steps.get(optimizer_index, 0)
        self._optimizer_steps[optimizer_index] = count + 1
        return count

    def _base_record(self, trainer: pl.Trainer, optimizer_index: int) -> dict[str, Any]:
        record: dict[str, Any] = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        if len(trainer.optimizers) > 1:
            record["optimizer"] = optimizer_index
        return record
