"""`ActivationStatsMonitor`: per-layer activation statistics and effective rank on the probe set."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure

from lightning_probes.callbacks.base import FigureSpec
from lightning_probes.callbacks.representation_base import RepresentationProbe
from lightning_probes.capture import BOUNDED
from lightning_probes.checks import check_float
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

    Memory: the pass streams: each layer's output is added to its statistics inside its forward hook and never
    kept, so the analysis holds one forward batch and the accumulators, of which the effective rank's float64
    ``(p x p)`` sums (``8 p**2`` bytes per layer of ``p`` kept features) are the large part. The probe draws on
    the memory budget its Trainer's probes share (`lightning_probes.set_memory_budget`; by default 10% of the
    model's parameter memory, at least 64 MiB, split equally) or on its own ``max_memory_gb``: at the
    pre-flight, when those sums over the selected layers do not fit 75% of the share, the widest layers keep
    fewer features for the effective rank (with ``layers`` and ``max_features`` at their defaults; one warning),
    or the run stops with an error naming the share (``layers`` or ``max_features`` set); the other statistics
    always see every unit. The rest of the share sizes the forward batches (`AnalysisProbe.plan_forward_batch`).

    Args:
        max_memory_gb: Memory (GB, 1e9 bytes, > 0) of this probe's analysis, outside the shared budget; ``None``
            (default): its share of the budget.
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
    uses_memory_budget = True
    layout_stats = _STATS

    def __init__(self, max_memory_gb: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if max_memory_gb is not None:
            check_float("max_memory_gb", max_memory_gb, low=0.0, low_open=True)
        self.max_memory_gb = None if max_memory_gb is None else float(max_memory_gb)

    def fit_caps(self, widths: dict[str, int]) -> dict[str, int]:
        return self.fit_caps_in_share(super().fit_caps(widths), "the float64 effective-rank sums")

    def accumulator_bytes(self, widths: Sequence[int]) -> int:
        return estimated_bytes(widths)

    def held_bytes_per_sample(self) -> float:
        # One layer at a time, inside its hook: the statistics' temporaries (a float32 square and three masks
        # of the output) and the float64 rows of the effective rank.
        batch = max(1, self._check_batch or 1)
        rows = self.rows_per_sample()
        return max((8.0 * math.prod(self._shapes[n]) / batch + 16.0 * rows[n] * w
                    for n, w in (self._widths or {}).items()), default=0.0)

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
    """One analysis of an `ActivationStatsMonitor`: its accumulators, fed layer by layer inside the forward hooks
    with the raw layer outputs (`consume_layer`; nothing of the output is kept), then turned into records
    (`finish`)."""

    def __init__(self, probe: ActivationStatsMonitor) -> None:
        self.probe = probe
        self.stats = {name: ActivationAccumulator(next((b for t, b in BOUNDED.items() if isinstance(m, t)), None))
                      for name, m in probe._modules.items()}
        self.ranks: dict[str, EffectiveRankAccumulator] = {}

    def consume_layer(self, name: str, output: torch.Tensor, batch: Optional[int] = None) -> None:
        """Add one layer's raw output of this batch to its statistics."""
        probe = self.probe
        batch = probe.batch_now if batch is None else batch
        self.stats[name].update(unit_rows(output, probe._layouts[name], batch))  # a unit: a channel or a feature
        rows = probe._reducers[name](output, batch)
        if name not in self.ranks:
            self.ranks[name] = EffectiveRankAccumulator(rows.shape[1], device=rows.device)
        self.ranks[name].update(rows)

    def end_batch(self, batch: Optional[int] = None) -> None:
        """Nothing to do: every layer was added in its hook."""

    def consume(self, outputs: dict[str, torch.Tensor], batch: Optional[int] = None) -> None:
        """Add one batch of raw outputs ``{layer: output}`` (``batch``: its samples; default the probe's)."""
        for name, output in outputs.items():
            self.consume_layer(name, output, batch)

    def finish(self, trainer: pl.Trainer, epoch: int) -> dict[str, Any]:
        """Records, scalars and figure of this analysis; returns the headline scalars."""
        return self.probe._finish(trainer, epoch, self.stats, self.ranks)


def estimated_bytes(widths: Sequence[int]) -> int:
    """Peak bytes of the effective-rank accumulators of layers of ``widths`` kept features, the forward batch
    aside: per layer a float64 ``(p x p)`` covariance sum (or at most ``p`` kept rows of ``p``), and at the end
    the covariance and the eigen-solver's work of the widest layer."""
    return sum(8 * w * w + 24 * w for w in widths) + 16 * max(widths, default=0) ** 2


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
