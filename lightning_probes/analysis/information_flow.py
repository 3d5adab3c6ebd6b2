"""Information flow of finished runs: per layer, the activation mean and std, sparsity, dead units, positive ratio
and effective rank of the signal leaving each block (`ActivationStatsMonitor`'s maths).

With data they are computed on the analysed samples (`lightning_probes.analysis.forward.run_model`); without, the
last epoch of the run's ``probes/activation_stats.jsonl`` gives them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
from matplotlib.figure import Figure

from lightning_probes.callbacks.guard import data_records
from lightning_probes.io import read_jsonl

__all__ = ["FLOW_STATS", "flow_figure", "flow_from_probes"]

#: The statistics shown per layer.
FLOW_STATS = ("mean", "std", "sparsity", "dead_fraction", "positive_ratio", "effective_rank")


def flow_from_probes(probes: Optional[str], name: str = "activation_stats") -> tuple[Optional[dict[str, Any]], str]:
    """The per-layer records of the last epoch in ``probes/<name>.jsonl``.

    Returns:
        ``({"layers": {layer: stats}, "epoch": e, "source": ...}, note)``, or ``(None, why not)``.
    """
    path = os.path.join(probes, f"{name}.jsonl") if probes else None
    if path is None or not os.path.isfile(path):
        return None, f"no probes/{name}.jsonl (ActivationStatsMonitor was not attached)"
    records = data_records(read_jsonl(path))
    if not records:
        return None, f"probes/{name}.jsonl is empty"
    epoch = max(r["epoch"] for r in records)
    layers = {r["layer"]: {k: v for k, v in r.items() if k not in ("epoch", "step", "layer")}
              for r in records if r["epoch"] == epoch}
    source = f"probes/{name}.jsonl, epoch {epoch}"
    return {"layers": layers, "epoch": epoch, "source": source}, source


def flow_figure(per_model: Mapping[str, Mapping[str, Any]]) -> Figure:
    """One panel per statistic, the layers in order along x, a line per model."""
    fig = Figure(figsize=(12, 7), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, stat in zip(axes, FLOW_STATS):
        for i, (name, result) in enumerate(per_model.items()):
            layers = result["layers"]
            values = [np.nan if layers[layer].get(stat) is None else layers[layer][stat] for layer in layers]
            ax.plot(range(len(values)), values, marker="o", linewidth=1, color=f"C{i % 10}", label=name)
            ax.set_xticks(range(len(layers)), list(layers), rotation=45, ha="right", fontsize=7)
        ax.set_title(stat, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle("Information flow: the signal leaving each block")
    return fig
