"""`ProbeOutputs`: the figures, files, TensorBoard layout and settings every probe writes (global rank 0)."""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn

from lightning_probes.callbacks.guard import data_records
from lightning_probes.io import (
    atomic_save_npz,
    atomic_write_bytes,
    atomic_write_json,
    decode_png,
    read_jsonl,
    render_png,
)

log = logging.getLogger(__name__)

__all__ = ["FigureSpec", "ProbeOutputs", "log_probe_settings"]

_HPARAM_TYPES = (bool, int, float, str, type(None))
#: A figure that can be drawn later: ``(file name in <name>/, logger tag relative to the probe, draw())``.
FigureSpec = tuple[str, str, Callable[[], Any]]


class ProbeOutputs:
    """The output side of `lightning_probes.callbacks.base.ProbeCallback`: figures (drawn now or at the end of
    the fit), images and figures for every logger that takes them, JSON and NPZ files in ``<name>/``, the probe's
    charts in TensorBoard's custom-scalars layout and its settings as hyper-parameters. See `ProbeCallback` for
    the files and the figure schedule."""

    name: str
    plot_every_n_epochs: int
    layout_stats: Sequence[str]
    _pending_figures: dict
    _output_dir_arg: Any

    # -- figures and files --------------------------------------------------------------------------
    def figures_due(self, trainer: pl.Trainer, epochs_done: int) -> bool:
        """Whether the matplotlib figures are drawn now: every ``plot_every_n_epochs`` completed epochs during a
        fit (never with 0), always outside a fit (``validate``, ``test``: no fit end to draw them at)."""
        every = self.plot_every_n_epochs
        if every <= 0:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        return epochs_done > 0 and epochs_done % every == 0

    def figure(self, trainer: pl.Trainer, filename: str, tag: str, step: int, draw: Callable[[], Any],
               epochs_done: int) -> None:
        """Draw a figure now if `figures_due`, else keep ``draw`` until the end of the fit (replacing an older
        pending version of ``filename``). Global rank 0 only.

        Args:
            trainer: The Trainer.
            filename: File in ``<output_dir>/<name>/``.
            tag: Logger tag, relative to the probe (see `save_figure`).
            step: Logger step.
            draw: Builds the ``matplotlib.figure.Figure`` from data the probe has already written to its files.
            epochs_done: Completed training epochs that the figure shows.
        """
        if not trainer.is_global_zero or self.plot_every_n_epochs <= 0:
            return
        self.flush_records()  # a drawing may read the probe's files
        if self.figures_due(trainer, epochs_done):
            self._pending_figures.pop(filename, None)
            self.save_figure(trainer, draw(), filename, tag, step)
        else:
            self._pending_figures[filename] = (tag, step, draw)

    def draw_pending_figures(self, trainer: pl.Trainer) -> None:
        """Draw the figures kept by `figure` since they were last drawn (global rank 0)."""
        pending, self._pending_figures = self._pending_figures, {}
        if trainer.is_global_zero:
            self.flush_records()  # a drawing may read the probe's files
            for filename, (tag, step, draw) in pending.items():
                self.save_figure(trainer, draw(), filename, tag, step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw_pending_figures(trainer)

    @classmethod
    def figures_from_files(cls, directory: str, name: str, settings: Mapping[str, Any]) -> list[FigureSpec]:
        """Every figure of a finished (or crashed) run of this probe, from its files alone.

        Args:
            directory: The probes directory (holding ``<name>.jsonl`` and ``<name>/``).
            name: The probe's ``name``.
            settings: Its settings (``settings.json``'s ``"settings"``; empty when the run predates it).

        Returns:
            ``[(filename, tag, draw), ...]``: the figures the probe would have written last, each drawn by the
            same function the probe uses. Empty for probes that draw nothing from their files.
        """
        return []

    @staticmethod
    def records_of(directory: str, name: str) -> list[dict[str, Any]]:
        """The records of ``<directory>/<name>.jsonl`` (empty when it does not exist)."""
        path = os.path.join(directory, f"{name}.jsonl")
        return data_records(read_jsonl(path)) if os.path.exists(path) else []

    def log_image(self, trainer: pl.Trainer, image: Any, tag: str, step: int) -> None:
        """Send an ``(H, W, 3)`` uint8 image (e.g. `lightning_probes.plotting.colormapped`) to every logger that
        takes images, as `save_figure` does with figures (milliseconds: no matplotlib). Global rank 0 only."""
        if not trainer.is_global_zero:
            return
        tag = f"{self.name}/{tag}"
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            add_image = getattr(experiment, "add_image", None)
            log_image = getattr(logger, "log_image", None)
            mlflow_image = getattr(experiment, "log_image", None)
            if callable(add_image):
                add_image(tag, image, global_step=step, dataformats="HWC")
            elif callable(log_image):
                log_image(key=tag, images=[image], step=step)
            elif callable(mlflow_image) and getattr(logger, "run_id", None):
                mlflow_image(logger.run_id, image, f"{tag}/step_{step:08d}.png")

    def save_figure(self, trainer: pl.Trainer, fig: Any, filename: str, tag: str, step: int) -> None:
        """Render a ``matplotlib.figure.Figure`` once; write it to ``<output_dir>/<name>/<filename>`` and send it to
        every logger that takes images. Global rank 0 only.

        ``tag`` is relative to the probe: the loggers see ``<name>/<tag>``. Loggers are recognised by what they
        can do: an ``experiment`` with ``add_image`` (TensorBoard), a ``log_image(key, images, step)`` method
        (Weights & Biases), an ``experiment`` with ``log_figure`` and a ``run_id`` (MLflow).
        """
        if not trainer.is_global_zero:
            return
        png = render_png(fig)
        atomic_write_bytes(self.path(filename), png)
        tag = f"{self.name}/{tag}"
        image = None
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            add_image = getattr(experiment, "add_image", None)
            log_image = getattr(logger, "log_image", None)
            log_figure = getattr(experiment, "log_figure", None)
            if callable(add_image):
                image = decode_png(png) if image is None else image
                add_image(tag, image, global_step=step, dataformats="HWC")
            elif callable(log_image):
                image = decode_png(png) if image is None else image
                log_image(key=tag, images=[image], step=step)
            elif callable(log_figure) and getattr(logger, "run_id", None):
                log_figure(logger.run_id, fig, f"{tag}/step_{step:08d}.png")

    def save_json(self, trainer: pl.Trainer, obj: Any, filename: str) -> None:
        """Write a JSON summary to ``<output_dir>/<name>/<filename>`` atomically (global rank 0 only)."""
        if trainer.is_global_zero:
            atomic_write_json(self.path(filename), obj)

    def save_npz(self, trainer: pl.Trainer, filename: str, **arrays: Any) -> None:
        """Write NumPy arrays to ``<output_dir>/<name>/<filename>`` atomically (global rank 0 only)."""
        if trainer.is_global_zero:
            atomic_save_npz(self.path(filename), **arrays)

    # -- TensorBoard layout and hyper-parameters ----------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        """The probe's settings: every constructor argument (of the class and its bases) kept under its own
        name as a plain value."""
        out: dict[str, Any] = {}
        for cls in type(self).__mro__:
            if not (isinstance(cls, type) and issubclass(cls, ProbeOutputs)):
                continue
            for param in inspect.signature(cls.__init__).parameters:
                if param in out or param == "self" or not hasattr(self, param):
                    continue
                value = getattr(self, param)
                if isinstance(value, (list, tuple)) and all(isinstance(v, _HPARAM_TYPES) for v in value):
                    value = str(list(value))
                if isinstance(value, _HPARAM_TYPES):
                    out[param] = value
        out["output_dir"] = self._output_dir_arg
        return out

    def layout(self) -> dict[str, list[Any]]:
        """This probe's charts in TensorBoard's custom-scalars layout: one multi-line chart per statistic, all
        layers as lines."""
        return {stat: ["Multiline", [f"^{re.escape(self.name)}/{re.escape(stat)}/"]] for stat in self.layout_stats}


def log_probe_settings(trainer: pl.Trainer, probes: Sequence[Any]) -> None:
    """One custom-scalars layout for every probe (TensorBoard) and the probes' settings as hparams (every logger,
    merged with what the logger already holds, since TensorBoard shows only the latest hparams record)."""
    layout = {p.name: p.layout() for p in probes if p.layout()}
    settings = {f"probes/{p.name}/{k}": v for p in probes for k, v in p.hparams().items()}
    for logger in trainer.loggers:
        add_custom_scalars = getattr(getattr(logger, "experiment", None), "add_custom_scalars", None)
        if layout and callable(add_custom_scalars):
            add_custom_scalars(layout)
        existing = getattr(logger, "hparams", None)
        merged = {**(dict(existing) if isinstance(existing, Mapping) else {}), **settings}
        try:
            logger.log_hyperparams(merged)
        except Exception as err:  # noqa: BLE001 (a logger that rejects a setting must not stop training)
            log.warning("Could not log the probes' settings to %s: %s", type(logger).__name__, err)
