"""`NoiseRobustnessMonitor`: how often predictions survive Gaussian input noise."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure

from lightning_probes.callbacks.analysis_base import AnalysisProbe
from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS, FigureSpec, check_plot_every
from lightning_probes.checks import check_float, check_positive_int
from lightning_probes.functional.robustness import check_logits, kl_from_clean, noisy_logits, stability_ratio
from lightning_probes.probe_data import (
    ProbeInputError,
    batch_inputs,
    module_device_dtype,
    replace_inputs,
    run_forward,
    to_module,
)

log = logging.getLogger(__name__)


class NoiseRobustnessMonitor(AnalysisProbe):
    """Stability of predictions under Gaussian input noise, on a fixed, class-balanced validation subset.

    At the end of every ``every_n_epochs``-th validation epoch (global rank 0, in
    `lightning_probes.probe_data.analysis_mode`: ``eval()``, ``no_grad``, forked random state, modes restored),
    each of ``num_samples`` validation samples (chosen once, seeded, balanced over classes where the batches
    carry labels, from the first ``search_batches`` validation batches) is copied ``num_draws`` times with
    ``sigma * N(0, 1)`` added to its input tensor (``sigma`` in the inputs' normalised units). Its stability
    ratio is the share of noisy predictions (argmax of the logits) equal to the clean prediction. Logged as
    ``<name>/stability_ratio_mean`` (the headline: also in ``trainer.callback_metrics``, on every rank, for
    ``EarlyStopping``/``ModelCheckpoint``), ``..._median``, ``..._mean_correct``, ``..._mean_wrong`` (split
    by whether the clean prediction is right; needs labels) and, with ``kl=True``, ``kl_mean`` (mean KL
    divergence of the noisy from the clean softmax). Records go to ``<name>.jsonl``; per-sample ratios are
    saved each epoch to ``<name>/epoch<E>.npz`` (``sample_index``, ``label`` (-1 without labels),
    ``clean_pred``, ``ratio``, ``kl``), the label set for models that learn to predict confidence; a histogram
    goes to ``<name>/histogram.png``.

    Logits: ``pl_module(x)`` by default, which must be a floating ``(N, num_classes)`` tensor; ``logits_fn``
    gets them from models that return tuples or dicts; ``forward_fn`` runs the model on the whole (noisy) batch
    (several inputs) and must return the logits. The noise goes to the input tensor: the batch's first element,
    or ``batch[input_key]``; it must be floating point (token ids cannot be perturbed this way).

    Args:
        num_samples: Validation samples to probe.
        num_draws: Noisy copies of each sample.
        sigma: Standard deviation of the noise, in normalised input units (>= 0).
        kl: Also compute the mean KL divergence from the clean softmax.
        every_n_epochs: Analyse every n-th validation epoch.
        seed: Seed of the sample choice and of the noise.
        chunk_size: Most noisy inputs per forward pass.
        search_batches: Validation batches searched for the subset (bounds the one-off cost).
        logits_fn: ``logits_fn(pl_module, x) -> (N, num_classes)`` logits of an input tensor, e.g.
            ``lambda module, x: module(x)[0]``; default ``pl_module(x)``. Not together with ``forward_fn``.
        forward_fn: ``forward_fn(pl_module, batch) -> (N, num_classes)`` logits of a whole probe batch whose
            input tensor holds the noisy copies (models with several inputs). Not together with ``logits_fn``.
        input_key: For dict batches: the key of the input tensor to perturb.
        target_key: For dict batches: the key of the class labels.
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default ``noise_robustness``. Two monitors (say, two
            ``sigma``) need two names.
        plot_every_n_epochs: Draw ``histogram.png`` every n completed epochs and at the end of the fit; 0: never
            during training (``lightning-probes plot`` redraws it from the JSONL and ``epoch<E>.npz``).
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: After the run started, ``"warn"`` (default) turns an exception inside the probe into one warning,
            a ``{"disabled": true}`` record and a disabled probe while training goes on; ``"raise"`` re-raises.
            ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"`` (see `lightning_probes.callbacks.guard`).

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[NoiseRobustnessMonitor(sigma=0.5)])
    """

    probe_name = "noise_robustness"
    layout_stats = ()

    def __init__(
        self,
        num_samples: int = 200,
        num_draws: int = 50,
        sigma: float = 0.1,
        kl: bool = False,
        every_n_epochs: int = 1,
        seed: int = 0,
        chunk_size: int = 2048,
        search_batches: int = 50,
        logits_fn: Optional[Callable[[Any, Any], Any]] = None,
        forward_fn: Optional[Callable[[Any, Any], Any]] = None,
        input_key: Optional[str] = None,
        target_key: Optional[str] = None,
        output_dir: Optional[str] = None,
        name: Optional[str] = None,
        plot_every_n_epochs: int = 10,
        flush_every_n_steps: Optional[int] = None,
        flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
        on_error: Optional[str] = None,
    ) -> None:
        super().__init__(num_samples, seed, search_batches, forward_fn, input_key, target_key, output_dir, name,
                         flush_every_n_steps=flush_every_n_steps, flush_secs=flush_secs, on_error=on_error)
        self.plot_every_n_epochs = check_plot_every(plot_every_n_epochs)
        check_positive_int("num_draws", num_draws)
        check_positive_int("every_n_epochs", every_n_epochs)
        check_positive_int("chunk_size", chunk_size)
        check_float("sigma", sigma, low=0.0)
        if logits_fn is not None and not callable(logits_fn):
            raise ValueError(f"Expected `logits_fn` to be None or a callable `logits_fn(pl_module, x)`, but got "
                             f"{logits_fn!r}")
        if logits_fn is not None and forward_fn is not None:
            raise ValueError("Pass either `logits_fn` (logits of the input tensor) or `forward_fn` (logits of the "
                             "whole batch), not both")
        self.num_draws, self.sigma, self.kl = num_draws, float(sigma), bool(kl)
        self.every_n_epochs, self.chunk_size = every_n_epochs, chunk_size
        self.logits_fn = logits_fn

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        self.run_analysis(trainer, pl_module, trainer.current_epoch)

    def _logits(self, batch: Any) -> Callable[[Any, torch.Tensor], torch.Tensor]:
        """``fn(module, x)``: the checked ``(n, C)`` logits of ``batch`` with its input tensor replaced by ``x``."""
        if self.logits_fn is not None:
            return lambda module, x: _checked(self.logits_fn(module, x), len(x), "logits_fn")
        if self.forward_fn is not None:
            return lambda module, x: _checked(self.forward_fn(module, replace_inputs(batch, x, self.input_key)),
                                              len(x), "forward_fn")
        return lambda module, x: _checked(run_forward(module, replace_inputs(batch, x, self.input_key), None,
                                                      self.input_key), len(x), "logits_fn")

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> dict[str, Any]:
        probe = self.probe_set(trainer)
        inputs = probe.inputs(self.input_key, "forward_fn")
        if not inputs.is_floating_point():
            where = f"batch[{self.input_key!r}]" if self.input_key else "the batch's first element"
            raise ProbeInputError(f"{type(self).__name__} adds Gaussian noise to the input tensor ({where}), but it "
                                  f"holds {inputs.dtype} values (token ids?); choose a floating-point input with "
                                  "`input_key`, or leave this probe out for this model")
        device, _ = module_device_dtype(pl_module)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        clean, noisy = [], []
        for batch in probe.chunks(self.chunk_size):
            batch = to_module(batch, pl_module)
            x = batch_inputs(batch, self.input_key)
            fn = self._logits(batch)
            clean.append(fn(pl_module, x).double())  # (n, C)
            noisy.append(noisy_logits(pl_module, x, self.sigma, self.num_draws, generator, len(x), fn).double())
        clean_logits, noisy_all = torch.cat(clean), torch.cat(noisy, dim=1)  # (N, C), (D, N, C)
        clean_pred = clean_logits.argmax(dim=1)
        ratio = stability_ratio(clean_pred, noisy_all.argmax(dim=2))
        labels = probe.labels.numpy() if probe.labels is not None else np.full(len(ratio), -1)
        results = {"sample_index": probe.indices.numpy(), "label": labels,
                   "clean_pred": clean_pred.cpu().numpy(), "ratio": ratio.cpu().numpy()}
        results["kl"] = kl_from_clean(clean_logits, noisy_all).cpu().numpy() if self.kl \
            else np.full(len(ratio), np.nan)
        summary = self._report(trainer, epoch, results, has_labels=probe.labels is not None)
        return {f"{self.name}/stability_ratio_mean": summary["stability_ratio_mean"]}

    def _report(self, trainer: pl.Trainer, epoch: int, results: dict[str, np.ndarray],
                has_labels: bool) -> dict[str, Any]:
        ratio = results["ratio"]
        correct = results["clean_pred"] == results["label"]
        summary = {
            "stability_ratio_mean": float(ratio.mean()),
            "stability_ratio_median": float(np.median(ratio)),
            "stability_ratio_mean_correct": float(ratio[correct].mean()) if correct.any() else None,
            "stability_ratio_mean_wrong": float(ratio[~correct].mean()) if has_labels and (~correct).any() else None,
            "clean_accuracy": float(correct.mean()) if has_labels else None,
            "kl_mean": float(np.nanmean(results["kl"])) if self.kl else None,
        }
        step = trainer.global_step
        record = {"epoch": epoch, "step": step, "sigma": self.sigma, "num_samples": len(ratio),
                  "num_draws": self.num_draws, **summary}
        self.write_records(trainer, [record])
        others = [k for k in summary if k != "stability_ratio_mean"]  # the headline is logged by `run_analysis`
        self.log_scalars(trainer, self.scalars([summary], others), step)
        self.save_npz(trainer, f"epoch{epoch}.npz", **results)
        mean = summary["stability_ratio_mean"]
        self.figure(trainer, "histogram.png", "histogram", step,
                    lambda: histogram_figure(ratio, results["clean_pred"], results["label"], has_labels, self.sigma,
                                             epoch, mean), epoch + 1)
        return summary

    @classmethod
    def figures_from_files(cls, directory: str, name: str, settings: Mapping[str, Any]) -> list[FigureSpec]:
        """``histogram.png`` of the last analysis: its record in the JSONL and its ``epoch<E>.npz``."""
        records = cls.records_of(directory, name)
        if not records:
            return []
        last = records[-1]
        path = os.path.join(directory, name, f"epoch{last['epoch']}.npz")
        if not os.path.exists(path):
            return []
        with np.load(path) as data:
            ratio, pred, label = data["ratio"], data["clean_pred"], data["label"]
        has_labels = bool((label >= 0).all())
        return [("histogram.png", "histogram",
                 lambda: histogram_figure(ratio, pred, label, has_labels, last["sigma"], last["epoch"],
                                          last["stability_ratio_mean"]))]


def histogram_figure(ratio: np.ndarray, clean_pred: np.ndarray, label: np.ndarray, has_labels: bool, sigma: float,
                     epoch: int, mean: float) -> Figure:
    """Histogram of the per-sample stability ratios, stacked by whether the clean prediction is right."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(0, 1, 21)
    if has_labels:
        correct = clean_pred == label
        ax.hist([ratio[correct], ratio[~correct]], bins=bins, stacked=True, label=["clean correct", "clean wrong"])
        ax.legend(fontsize=7)
    else:
        ax.hist(ratio, bins=bins)
    ax.set(xlabel="stability ratio", ylabel="samples", title=f"sigma {sigma:g}, epoch {epoch}: mean {mean:.3f}")
    return fig


def _checked(logits: Any, rows: int, source: str) -> torch.Tensor:
    """`check_logits`, its ``TypeError`` raised as a `ProbeInputError` (a configuration error for the CLI)."""
    try:
        return check_logits(logits, rows, source)
    except TypeError as err:
        raise ProbeInputError(str(err)) from None
