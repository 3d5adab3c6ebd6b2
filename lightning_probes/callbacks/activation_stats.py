"""`ActivationStatsMonitor`: per-layer activation statistics and effective rank on the probe set."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure

from lightning_probes.callbacks.base import FigureSpec
from lightning_probes.callbacks.representation_base import RepresentationProbe
from lightning_probes.capture import BOUNDED
from lightning_probes.feature_rows import unit_rows
from lightning_probes.functional.activations import ActivationAccumulator
from lightning_probes.functional.representations import EffectiveRankAccumulator

_STATS = ("mean", "std", "sparsity", "positive_ratio", "dead_fraction", "saturation", "effective_rank")


class ActivationStatsMonitor(RepresentationProbe):
    """Per-layer statistics of the layer outputs on the probe set, at the start and every ``every_n_epochs``.

    For each selected layer (see `RepresentationProbe`), accumulated batch by batch (float64 sums):

    - ``mean`` and ``std`` (population) over all output entries;
    - ``sparsity``: share of exact zeros; ``positive_ratio``: share of entries > 0;
    - ``dead_units`` / ``dead_fraction``: units (channels of conv outputs, features otherwise, the last
      dimension of a ``(batch, tokens, features)`` output) never non-zero on the probe set;
    - ``saturation``: for bounded activations (tanh, sigmoid, hardtanh, ReLU6, softmax), the share of entries
      within 1% of the range of either bound; ``null`` for other layers;
    - ``effective_rank`` (Roy and Vetterli 2007): ``exp(-sum_i p_i log p_i)`` with ``p_i = s_i / sum_j s_j``
      and ``s`` the singular values of the centred feature rows (a ``(batch, tokens, features)`` output read by
      ``token_mode``, at most ``max_features`` features, see `lightning_probes.feature_rows`); computed from the
      ``(rows x rows)`` Gram matrix when the layer is wider than its rows, else from the streamed covariance
      (`lightning_probes.functional.EffectiveRankAccumulator`); ``null`` when the layer gave fewer than 2 rows
      (a probe set of one sample), where the other statistics are still defined.

    Records per (epoch, layer) go to ``<name>.jsonl`` and the scalars ``<name>/<stat>/<layer>``; an overview
    figure of every statistic across layers to ``<name>/overview.png`` (every ``plot_every_n_epochs`` epochs and
    at the end of the fit; ``lightning-probes plot`` redraws it from the JSONL). The headline ``<name>/dead_fraction``
    (mean over layers of the share of dead units) goes to the loggers and to ``trainer.callback_metrics``.

    Args:
        layers: Module names to analyse; default every leaf module with parameters plus activation modules.
        num_samples: Size of the probe set.
        max_features: Features kept per layer for the effective rank.
        token_mode: ``"samples"``, ``"mean"`` or ``"flatten"``: the rows of a ``(batch, tokens, features)``
            output for the effective rank (see `RepresentationProbe`).
        every_n_epochs: Analyse after every n-th epoch.
        plot_every_n_epochs: Draw ``overview.png`` every n completed epochs and at the end of the fit; 0: never
            during training.
        batch_size: Probe samples per forward pass.
        seed: Seed of the probe-set choice.
        search_batches: Validation batches searched for the probe set.
        forward_fn: ``forward_fn(pl_module, batch)``: runs the model on one probe batch (several inputs, dict
            batches); default ``pl_module(inputs)``. See `AnalysisProbe`.
        input_key: For dict batches: the key of the input tensor.
        target_key: For dict batches: the key of the class labels that balance the probe set.
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default ``activation_stats``.
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[ActivationStatsMonitor(every_n_epochs=2)])
    """

    probe_name = "activation_stats"
    shares_pass = True
    layout_stats = _STATS

    def analyse_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> dict[str, Any]:
        probe = self.probe_set(trainer)
        session = self.start_session()
        self.for_each_batch(pl_module, probe.chunks(self.batch_size), session.consume, raw=True)
        return session.finish(trainer, epoch)

    def start_session(self) -> ActivationStatsSession:
        """Fresh accumulators for one analysis (see `ActivationStatsSession`)."""
        return ActivationStatsSession(self)

    def _finish(self, trainer: pl.Trainer, epoch: int, stats: dict[str, ActivationAccumulator],
                ranks: dict[str, EffectiveRankAccumulator]) -> dict[str, Any]:
        records = []
        for name in self._modules:
            values = stats[name].compute()
            rank = ranks.get(name)  # undefined for fewer than 2 rows (a probe set of one sample): null
            values["effective_rank"] = float(rank.compute()) if rank is not None and rank.n >= 2 else None
            records.append({"epoch": epoch, "step": trainer.global_step, "layer": name, **values})
        self.write_records(trainer, records)
        step = trainer.global_step
        self.log_scalars(trainer, self.scalars(records, _STATS), step)
        self.figure(trainer, "overview.png", "overview", step, lambda: overview_figure(records, epoch), epoch)
        return {f"{self.name}/dead_fraction": float(np.mean([r["dead_fraction"] for r in records]))}

    @classmethod
    def figures_from_files(cls, directory: str, name: str, settings: Mapping[str, Any]) -> list[FigureSpec]:
        """``overview.png`` of the last analysis in the JSONL."""
        records = cls.records_of(directory, name)
        if not records:
            return []
        last = [r for r in records if (r["epoch"], r["step"]) == (records[-1]["epoch"], records[-1]["step"])]
        return [("overview.png", "overview", lambda: overview_figure(last, last[0]["epoch"]))]


class ActivationStatsSession:
    """One analysis of an `ActivationStatsMonitor`: its accumulators, fed batch by batch with raw layer outputs
    (`consume`), then turned into records (`finish`)."""

    def __init__(self, probe: ActivationStatsMonitor) -> None:
        self.probe = probe
        self.stats = {name: ActivationAccumulator(next((b for t, b in BOUNDED.items() if isinstance(m, t)), None))
                      for name, m in probe._modules.items()}
        self.ranks: dict[str, EffectiveRankAccumulator] = {}

    def consume(self, outputs: dict[str, torch.Tensor], batch: Optional[int] = None) -> None:
        """Add one batch of raw outputs ``{layer: output}`` (``batch``: its samples; default the probe's)."""
        probe = self.probe
        batch = probe.batch_now if batch is None else batch
        for name, output in outputs.items():
            layout = probe._layouts[name]
            self.stats[name].update(unit_rows(output, layout, batch))  # a unit: a channel or a token feature
            rows = probe._reducers[name](output, batch)
            if name not in self.ranks:
                self.ranks[name] = EffectiveRankAccumulator(rows.shape[1], device=rows.device)
            self.ranks[name].update(rows)

    def finish(self, trainer: pl.Trainer, epoch: int) -> dict[str, Any]:
        """Records, scalars and figure of this analysis; returns the headline scalars."""
        return self.probe._finish(trainer, epoch, self.stats, self.ranks)


def overview_figure(records: list[dict[str, Any]], epoch: int) -> Figure:
    """One bar panel per statistic, a bar per layer (the records of one analysis)."""
    names = [r["layer"] for r in records]
    fig = Figure(figsize=(max(8.0, 0.5 * len(names) + 4), 9))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.93, hspace=0.5, wspace=0.25)
    axes = fig.subplots(4, 2).ravel()
    x = np.arange(len(names))
    for ax, stat in zip(axes, _STATS):
        values = [np.nan if r[stat] is None else r[stat] for r in records]
        ax.bar(x, values)
        ax.set_title(stat, fontsize=9)
        ax.set_xticks(x, names if ax in axes[-3:-1] else [""] * len(names), rotation=60, ha="right", fontsize=7)
    axes[-1].set_visible(False)
    fig.suptitle(f"Activation statistics, epoch {epoch}")
    return fig
