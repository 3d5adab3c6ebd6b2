"""`ProbeCallback`: the output plumbing every probe shares (JSONL, loggers, figures, headline metrics, resume)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_probes.budget import forget_plan
from lightning_probes.callbacks.guard import FailSafe, GuardState, check_on_error, data_records, install_guards
from lightning_probes.callbacks.memory import BudgetUser
from lightning_probes.callbacks.outputs import FigureSpec, ProbeOutputs, log_probe_settings
from lightning_probes.checks import check_float, check_fraction, check_positive_int
from lightning_probes.io import (
    JsonlWriter,
    read_jsonl,
)
from lightning_probes.record_buffer import Produce, RecordBuffer
from lightning_probes.run_dir import run_directory

log = logging.getLogger(__name__)

__all__ = ["FigureSpec", "ProbeCallback", "check_fraction", "check_plot_every",
           "check_positive_int"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Hooks after which a probe writes its buffered records, whether or not a subclass overriding them calls super().
_FLUSH_AFTER = ("on_train_epoch_end", "on_validation_epoch_end", "on_test_epoch_end", "on_predict_epoch_end",
                "on_exception", "teardown")
#: Default of ``flush_secs``: a record waits in memory at most this long (checked when the probe writes).
DEFAULT_FLUSH_SECS = 60.0


def _flushing(hook: Callable[..., None]) -> Callable[..., None]:
    """``hook`` followed by writing the probe's buffered records (and closing the file, after ``teardown``)."""
    closing = hook.__name__ == "teardown"
    on_error = hook.__name__ == "on_exception"  # writes what it can, never hides the exception being handled

    @functools.wraps(hook)
    def wrapper(self: ProbeCallback, *args: Any, **kwargs: Any) -> None:
        if not (closing or on_error):
            hook(self, *args, **kwargs)
            self.flush_records()
            return
        try:
            hook(self, *args, **kwargs)
        finally:
            self._flush_quietly(close=closing)

    wrapper._flushes = True  # type: ignore[attr-defined]
    return wrapper


def check_plot_every(value: Any) -> int:
    """``plot_every_n_epochs``, checked: an integer >= 0 (0: no figures during training)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected `plot_every_n_epochs` to be an integer >= 0 (0: no figures during training), "
                         f"but got {value!r}")
    return value


class ProbeCallback(FailSafe, BudgetUser, ProbeOutputs, Callback):
    """Base class of every probe: owns ``<output_dir>/<name>.jsonl``, ``<output_dir>/<name>/`` and the loggers.

    Files: the JSON Lines history is ``<output_dir>/<name>.jsonl`` (one record per line, written in bulk);
    every other file of the probe (summary JSON, PNG figures, NPZ arrays) lies in ``<output_dir>/<name>/``.
    Scalars are named ``<name>/<stat>[/<layer>]`` and go to every attached logger; figures go to every logger
    that takes images (TensorBoard ``add_image``, W&B ``log_image``, MLflow ``log_figure``). Only global rank 0
    writes files.

    Records in bulk: `write_records` and `defer_records` put records into an in-memory buffer, written to the
    JSONL in one append once its oldest record is ``flush_every_n_steps`` optimiser steps old (its records span
    that many steps) or ``flush_secs`` seconds old (checked when a record comes), and always before a checkpoint
    is saved (``state_dict``, which Lightning calls before ``on_save_checkpoint``, writes first, so the checkpoint's
    ``records_written`` counts what is on disk), after every epoch-end hook, on an exception, at teardown and at
    interpreter exit. `read_history` writes first. A run killed (``kill -9``, power loss) loses at most the
    buffered records: those of the last ``flush_every_n_steps`` steps or ``flush_secs`` seconds; a resume from a
    checkpoint restores every record up to the checkpoint. Subclasses may override the epoch-end hooks,
    ``on_exception`` and ``teardown`` without calling ``super()``: the buffer is written after them all the same.

    Resume: ``state_dict`` holds the output directory and the number of records written. When a run resumes
    from a checkpoint, the probe's history up to the checkpoint (the first ``records_written`` records, and
    the files in ``<name>/``) is copied into the new output directory if it differs (the default
    auto-versioned logger's ``version_N``), or the file is cut back to those records in place; records written
    after the checkpoint by the crashed run are dropped, as the resumed run writes them again. The old
    directory is never modified when the directories differ.

    Figures: probes with a ``plot_every_n_epochs`` argument draw their annotated matplotlib figures (the PNG
    files and their logger images) only every ``plot_every_n_epochs`` completed epochs and once more at the end
    of the fit for whatever was analysed since (`figure`); ``0`` draws none during training. Every number a
    figure shows is in the probe's JSONL and ``<name>/*.npz`` files, so ``lightning-probes plot RUN_DIR``
    redraws them all afterwards (`figures_from_files`). Cheap colour-mapped heatmaps (`log_image`) may go to
    the loggers at every analysis. ``<name>/settings.json`` holds the probe's class and settings (`hparams`).

    Args:
        output_dir: Directory for the outputs. Default: ``<trainer.log_dir>/probes``, or
            ``<trainer.default_root_dir>/probes`` without a logger; for a logger without a directory (MLflow on a
            database) ``<trainer.default_root_dir>/<logger name>/<version>/probes`` (`run_directory`).
        name: Names the probe's files and its scalar prefix, and enters its ``state_key``; two instances of one
            probe in one Trainer need distinct names. Default: the probe's file stem (e.g. ``gradient_stats``).
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps; 1 writes each
            step's records as they come. Default ``None``: the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old (> 0; ``None``: no time limit).
        on_error: What an exception raised inside the probe after the run started does (see
            `lightning_probes.callbacks.guard`): ``"warn"`` disables the probe with one warning and a
            ``{"disabled": true, ...}`` record and lets training go on; ``"raise"`` re-raises. ``None``: the
            environment variable ``LIGHTNING_PROBES_ON_ERROR``, else ``"warn"``.
    """

    probe_name: str = "probe"
    #: Draw the matplotlib figures every n completed epochs and at the end of the fit; 0: never during training.
    #: Probes that take the argument set it per instance; the others draw every figure when they make it.
    plot_every_n_epochs: int = 1
    #: Statistics logged per layer, for the TensorBoard custom-scalars layout (one chart per statistic).
    layout_stats: Sequence[str] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for hook in _FLUSH_AFTER:
            method = cls.__dict__.get(hook)
            if callable(method) and not getattr(method, "_flushes", False):
                setattr(cls, hook, _flushing(method))
        install_guards(cls)

    def __init__(self, output_dir: Optional[str] = None, name: Optional[str] = None,
                 flush_every_n_steps: Optional[int] = None, flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
                 on_error: Optional[str] = None) -> None:
        check_positive_int("flush_every_n_steps", flush_every_n_steps, allow_none=True)
        self.on_error = check_on_error(on_error)
        self._guard = GuardState()
        self._disabled: Optional[str] = None
        self._skipped_reason: Optional[str] = None
        if flush_secs is not None:
            check_float("flush_secs", flush_secs, low=0.0, low_open=True)
        self.flush_every_n_steps = flush_every_n_steps
        self.flush_secs = flush_secs
        self._buffer: Optional[RecordBuffer] = None
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise ValueError(f"Expected `output_dir` to be a path or None, but got {output_dir!r}")
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise ValueError(f"Expected `name` to be None or a file-name-safe string (letters, digits, '_', '-', "
                             f"'.'; not starting with '.', '_' or '-'), but got {name!r}")
        self.name = self.probe_name if name is None else name
        self._output_dir_arg = None if output_dir is None else os.fspath(output_dir)
        self._output_dir: Optional[str] = None
        self._writer: Optional[JsonlWriter] = None
        self._resume: Optional[tuple[Optional[str], int]] = None
        self._last_logger_step: Optional[int] = None
        self._pending_figures: dict[str, tuple[str, int, Callable[[], Any]]] = {}

    # -- identity and state -------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # Lightning reads it for every hook of every callback (its profiler's action name): built once per
        # (name, output_dir), not at every call.
        ident = (self.name, self._output_dir_arg)
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] != ident:
            cached = (ident, self._generate_state_key(name=self.name, output_dir=self._output_dir_arg))
            self.__dict__["_state_key_cache"] = cached
        return cached[1]

    def state_dict(self) -> dict[str, Any]:
        # Lightning collects the callbacks' state before `on_save_checkpoint`: write the buffer first, so the
        # checkpoint counts exactly the records on disk.
        self.flush_records()
        if self._writer is not None:
            records = self._writer.records_written
        else:
            records = self._resume[1] if self._resume is not None else 0
        return {"name": self.name, "output_dir": self._output_dir, "records_written": records}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        records = state_dict.get("records_written")
        if records is None:
            return
        self._resume = (state_dict.get("output_dir"), int(records))
        if self._writer is not None:  # Lightning restores callbacks after `setup`: restore the history now
            self._restore_history()

    def _restore_history(self) -> None:
        """Make ``<name>.jsonl`` hold exactly the history up to the checkpoint (global rank 0 only)."""
        source_dir, count = self._resume
        self._resume = None
        self.flush_records()  # anything still buffered belongs to the history being cut back
        target = self._writer.path
        source = os.path.join(source_dir, f"{self.name}.jsonl") if source_dir else target
        if os.path.abspath(source) == os.path.abspath(target):
            self._writer.restore(count)
            return
        kept = self._writer.restore(count, source=source)
        artifacts = os.path.join(source_dir, self.name)
        if os.path.isdir(artifacts):
            shutil.copytree(artifacts, os.path.join(self.output_dir, self.name), dirs_exist_ok=True)
        rank_zero_info(f"{type(self).__name__} {self.name!r}: resumed history of {kept} records copied from "
                       f"{source_dir} to {self.output_dir}")

    # -- output -------------------------------------------------------------------------------------
    @property
    def output_dir(self) -> str:
        """Where this probe writes; resolved in ``setup``."""
        if self._output_dir is None:
            raise RuntimeError(f"{type(self).__name__}.output_dir is known only after `setup`")
        return self._output_dir

    @property
    def jsonl_path(self) -> str:
        """Path of the probe's JSON Lines history."""
        return os.path.join(self.output_dir, f"{self.name}.jsonl")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._guard = GuardState()  # every fit, validate, test and predict starts clean (a reused probe too)
        self._disabled = self._skipped_reason = None
        self._last_logger_step = None
        self._pending_figures = {}
        forget_plan(trainer)  # the probes' pre-flight plans the shared memory budget anew (after every setup)
        self.reset_run()
        if self._output_dir_arg is not None:
            directory = self._output_dir_arg
        else:
            directory = os.path.join(run_directory(trainer), "probes")
        self._output_dir = os.path.abspath(directory)
        for other in trainer.callbacks:
            if other is not self and isinstance(other, ProbeCallback) and other._output_dir is not None \
                    and other.jsonl_path == self.jsonl_path:
                raise ValueError(f"Two probes ({type(other).__name__} and {type(self).__name__}) would both write "
                                 f"{self.jsonl_path}; give them distinct `name` arguments")
        if trainer.is_global_zero and (self._writer is None or self._writer.path != self.jsonl_path):
            self.flush_records()  # a probe reused in another Trainer writes the old run's records to the old file
            self._writer = JsonlWriter(self.jsonl_path)
            self._buffer = RecordBuffer(self._writer, None, self.flush_secs)
            if self._resume is not None:
                self._restore_history()
        if self._buffer is not None:
            self._buffer.flush_every_n_steps = (self.flush_every_n_steps if self.flush_every_n_steps is not None
                                                else max(1, trainer.log_every_n_steps))
        if trainer.is_global_zero:
            cls = type(self)
            self.save_json(trainer, {"class_path": f"{cls.__module__}.{cls.__qualname__}", "name": self.name,
                                     "settings": self.hparams()}, "settings.json")

    # Every epoch end, an exception and teardown write the buffer (and teardown closes the file); a subclass's
    # override of one of these hooks is wrapped to do the same after its own body (`__init_subclass__`).
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush_records()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush_records()

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush_records()

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush_records()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._flush_quietly()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._flush_quietly(close=True)

    for _hook in (on_train_epoch_end, on_validation_epoch_end, on_test_epoch_end, on_predict_epoch_end,
                  on_exception, teardown):
        _hook._flushes = True  # type: ignore[attr-defined]
    del _hook

    def path(self, filename: str) -> str:
        """Path of one of the probe's files: ``<output_dir>/<name>/<filename>``."""
        return os.path.join(self.output_dir, self.name, filename)

    def write_records(self, trainer: pl.Trainer, records: Iterable[Mapping[str, Any]]) -> None:
        """Append records to the probe's JSONL, through the buffer (global rank 0 only; others drop them).

        The records are taken as they are now (a list of the mappings; do not change them afterwards) and written
        in bulk (see the class docstring); their order in the file is the order of the calls.
        """
        if trainer.is_global_zero and self._buffer is not None:
            self._buffer.add(records, trainer.global_step)

    def probe_pass(self, trainer: pl.Trainer) -> contextlib.AbstractContextManager[None]:
        """A block of this probe's own passes through the model (not training's): every other probe's hooks are
        off during it (`other_probes_paused`), so that they record training's passes only."""
        return other_probes_paused(trainer, self)

    def defer_records(self, trainer: pl.Trainer, produce: Produce, block: Optional[torch.Tensor] = None) -> None:
        """Queue records that are made only when the buffer is written, in order with `write_records`' records.

        Use it to keep a logged step's statistics on their device until the flush: with ``block`` (a tensor, e.g.
        tensors x statistics, on any device), every block pending at a flush goes to the host in one copy per
        (device, dtype), and ``produce(block_on_host)`` makes the records from it; without, ``produce()`` is
        called. Global rank 0 only: on other ranks nothing is kept and ``produce`` is never called, so it must not
        enter a collective. Do not change ``block`` in place after handing it over.

        Args:
            trainer: The Trainer.
            produce: Returns the records (an iterable of mappings) when called at the flush.
            block: Optional tensor handed to ``produce`` on the CPU.
        """
        if trainer.is_global_zero and self._buffer is not None:
            self._buffer.defer(produce, trainer.global_step, block)

    def flush_records(self) -> int:
        """Write every buffered record now (global rank 0; elsewhere a no-op). Returns how many were written."""
        return self._buffer.flush() if self._buffer is not None else 0

    def _flush_quietly(self, close: bool = False) -> None:
        """`flush_records` on the way out (an exception, teardown): a failure is a warning, not a new exception."""
        try:
            self.flush_records()
        except Exception as err:  # noqa: BLE001 (never hide the exception being handled)
            log.warning("%s %r could not write its buffered records: %s", type(self).__name__, self.name, err)
            if self._buffer is not None:
                self._buffer.discard()
        if close and self._writer is not None:
            self._writer.close()

    def read_history(self) -> list[dict[str, Any]]:
        """Every data record of this run's history so far, the buffered ones included (global rank 0; the
        resumed history included; skip and disable records left out)."""
        if self._writer is None:
            return []
        self.flush_records()
        return data_records(read_jsonl(self._writer.path))

    # -- scalars ------------------------------------------------------------------------------------
    def scalars(self, records: Iterable[Mapping[str, Any]], keys: Iterable[str], *, layer_key: str = "layer",
                prefix: str = "") -> dict[str, Any]:
        """``{"<name>/<prefix><key>/<record[layer_key]>": value}`` for every record and key (the scalar names
        every probe uses); a record without ``layer_key`` gives ``<name>/<prefix><key>``."""
        keys = tuple(keys)
        out = {}
        for record in records:
            layer = record.get(layer_key)
            suffix = "" if layer is None else f"/{layer}"
            for key in keys:
                out[f"{self.name}/{prefix}{key}{suffix}"] = record.get(key)
        return out

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
        metrics = {k: float(v) for k, v in metrics.items()
                   if v is not None and not isinstance(v, bool) and math.isfinite(v)}
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def publish(self, trainer: pl.Trainer, metrics: Optional[Mapping[str, Optional[float]]],
                from_rank_zero: bool = False, status: Optional[tuple[str, str]] = None) -> Optional[tuple[str, str]]:
        """Put headline scalars into ``trainer.callback_metrics``, where ``EarlyStopping`` and
        ``ModelCheckpoint`` find them.

        Args:
            trainer: The Trainer.
            metrics: ``{name: value}``; ``None`` values are left out.
            from_rank_zero: The values exist on global rank 0 only (the analysis probes): every rank must call
                this, and rank 0's values are broadcast so that every process monitors the same numbers.
            status: What rank 0's analysis came to besides the values (``(kind, message)``, e.g. a failure):
                broadcast with them.

        Returns:
            Global rank 0's ``status`` on the other ranks (with ``from_rank_zero``), else ``None``.
        """
        remote = None
        if from_rank_zero and trainer.world_size > 1:
            sent = (dict(metrics) if metrics is not None else None, status)
            metrics, remote = trainer.strategy.broadcast(sent, src=0)
            remote = None if trainer.is_global_zero else remote
        for key, value in (metrics or {}).items():
            if value is not None and not isinstance(value, bool) and math.isfinite(value):
                trainer.callback_metrics[key] = torch.tensor(float(value))
        return remote
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probes = [cb for cb in trainer.callbacks if isinstance(cb, ProbeCallback)]
        if not trainer.is_global_zero or not probes or probes[0] is not self:
            return  # the first probe of the Trainer writes for all of them, once
        log_probe_settings(trainer, probes)


install_guards(ProbeOutputs)
install_guards(ProbeCallback)


@contextlib.contextmanager
def other_probes_paused(trainer: pl.Trainer, me: ProbeCallback) -> Iterator[None]:
    """The hooks other probes hold (their ``_handles``: `AttentionMonitor`'s and `ActivationOutlierMonitor`'s module
    hooks on their due steps, `GradientNoiseScaleMonitor`'s gradient hooks) taken off for the block and put back in
    their order after it: a probe's own forward and backward passes (`CurvatureMonitor`'s Hessian-vector products,
    `PerSampleGradientMonitor`'s ``vmap``) are not training's, and another probe's hook would record tensors that do
    not belong to the step (or, under ``vmap``, batched tensors it cannot read)."""
    from torch.utils.hooks import RemovableHandle

    taken: list[tuple[dict, int, Any]] = []
    for other in trainer.callbacks:
        if other is me or not isinstance(other, ProbeCallback):
            continue
        for handle in list(getattr(other, "_handles", None) or ()):
            if not isinstance(handle, RemovableHandle):
                continue
            refs = (handle.hooks_dict_ref, *getattr(handle, "extra_dict_ref", ()))
            for ref in refs:
                hooks = ref()
                if hooks is not None and handle.id in hooks:
                    taken.append((hooks, handle.id, hooks.pop(handle.id)))
    try:
        yield
    finally:
        touched = {}
        for hooks, key, value in taken:
            hooks[key] = value
            touched[id(hooks)] = hooks
        for hooks in touched.values():  # hook ids grow with registration: their order as it was
            items = sorted(hooks.items())
            hooks.clear()
            hooks.update(items)
