"""`NoiseRobustnessMonitor`: how often predictions survive Gaussian input noise."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure

from lightning_probes.callbacks.base import ProbeCallback, check_positive_int
from lightning_probes.functional.robustness import kl_from_clean, noisy_logits, stability_ratio
from lightning_probes.io import atomic_save_npz
from lightning_probes.probe_data import collect_probe_set, forked_rng

log = logging.getLogger(__name__)


class NoiseRobustnessMonitor(ProbeCallback):
    """Stability of predictions under Gaussian input noise, on a fixed, class-balanced validation subset.

    At the end of every ``every_n_epochs``-th validation epoch (global rank 0, model in ``eval()`` and
    ``no_grad``, previous mode restored), each of ``num_samples`` validation samples (chosen once, seeded,
    balanced over classes where possible, from the first ``search_batches`` validation batches) is copied
    ``num_draws`` times with ``sigma * N(0, 1)`` added (``sigma`` in the inputs' normalised units). Its
    stability ratio is the share of noisy predictions equal to the clean prediction. Logged as
    ``noise_robustness/stability_ratio_mean``, ``..._median``, ``..._mean_correct``, ``..._mean_wrong`` (split
    by whether the clean prediction is right) and, with ``kl=True``, ``kl_mean`` (mean KL divergence of the
    noisy from the clean softmax). Per-sample ratios are saved each epoch to
    ``noise_robustness_epoch<E>.npz`` (``sample_index``, ``label``, ``clean_pred``, ``ratio``, ``kl``), the
    label set for models that learn to predict confidence; a histogram goes to ``noise_robustness.png``.

    Args:
        num_samples: Validation samples to probe.
        num_draws: Noisy copies of each sample.
        sigma: Standard deviation of the noise, in normalised input units (>= 0).
        kl: Also compute the mean KL divergence from the clean softmax.
        every_n_epochs: Analyse every n-th validation epoch.
        seed: Seed of the sample choice and of the noise.
        chunk_size: Most noisy inputs per forward pass.
        search_batches: Validation batches searched for the subset (bounds the one-off cost).
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[NoiseRobustnessMonitor(sigma=0.5)])
    """

    probe_name = "noise_robustness"

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
        output_dir: Optional[str] = None,
    ) -> None:
        super().__init__(output_dir)
        check_positive_int("num_samples", num_samples)
        check_positive_int("num_draws", num_draws)
        check_positive_int("every_n_epochs", every_n_epochs)
        check_positive_int("chunk_size", chunk_size)
        check_positive_int("search_batches", search_batches)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"Expected `sigma` to be a finite float >= 0, but got {sigma!r}")
        self.num_samples, self.num_draws, self.sigma, self.kl = num_samples, num_draws, float(sigma), bool(kl)
        self.every_n_epochs, self.seed, self.chunk_size = every_n_epochs, seed, chunk_size
        self.search_batches = search_batches
        self._inputs: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None
        self._indices: Optional[torch.Tensor] = None

    def _state_config(self) -> Mapping[str, Any]:
        return {"sigma": self.sigma, "num_samples": self.num_samples, "output_dir": self._output_dir_arg}

    def _collect(self, trainer: pl.Trainer) -> None:
        self._inputs, self._labels, self._indices = collect_probe_set(trainer, self.num_samples, self.seed,
                                                                      self.search_batches)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.current_epoch % self.every_n_epochs:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with forked_rng(pl_module):  # iterating the val loader draws a seed from the global generator
                if self._inputs is None:
                    self._collect(trainer)
                results = self._analyse(pl_module)
        finally:
            pl_module.train(was_training)
        self._report(trainer, results)

    @torch.no_grad()
    def _analyse(self, pl_module: pl.LightningModule) -> dict[str, np.ndarray]:
        device = pl_module.device
        x = self._inputs.to(device)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        clean = torch.cat([pl_module(part) for part in x.split(self.chunk_size)])  # (N, C)
        noisy = noisy_logits(pl_module, x, self.sigma, self.num_draws, generator, self.chunk_size)  # (D, N, C)
        clean_pred = clean.argmax(dim=1)
        ratio = stability_ratio(clean_pred, noisy.argmax(dim=2))
        out = {"sample_index": self._indices.numpy(), "label": self._labels.numpy(),
               "clean_pred": clean_pred.cpu().numpy(), "ratio": ratio.cpu().numpy()}
        out["kl"] = kl_from_clean(clean, noisy).cpu().numpy() if self.kl else np.full(len(ratio), np.nan)
        return out

    def _report(self, trainer: pl.Trainer, results: dict[str, np.ndarray]) -> None:
        ratio = results["ratio"]
        correct = results["clean_pred"] == results["label"]
        summary = {
            "stability_ratio_mean": float(ratio.mean()),
            "stability_ratio_median": float(np.median(ratio)),
            "stability_ratio_mean_correct": float(ratio[correct].mean()) if correct.any() else None,
            "stability_ratio_mean_wrong": float(ratio[~correct].mean()) if (~correct).any() else None,
            "clean_accuracy": float(correct.mean()),
            "kl_mean": float(np.nanmean(results["kl"])) if self.kl else None,
        }
        epoch, step = trainer.current_epoch, trainer.global_step
        record = {"epoch": epoch, "step": step, "sigma": self.sigma, "num_samples": len(ratio),
                  "num_draws": self.num_draws, **summary}
        self.write_records(trainer, [record])
        self.log_scalars(trainer, {f"{self.probe_name}/{k}": v for k, v in summary.items()}, step)
        atomic_save_npz(self.path(f"{self.probe_name}_epoch{epoch}.npz"), **results)
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        bins = np.linspace(0, 1, 21)
        ax.hist([ratio[correct], ratio[~correct]], bins=bins, stacked=True, label=["clean correct", "clean wrong"])
        ax.set(xlabel="stability ratio", ylabel="samples",
               title=f"sigma {self.sigma:g}, epoch {epoch}: mean {summary['stability_ratio_mean']:.3f}")
        ax.legend(fontsize=7)
        self.save_figure(trainer, fig, f"{self.probe_name}.png", f"{self.probe_name}/histogram", step)
