"""Weight health of finished runs: statistics of every ``Linear`` / ``Conv`` weight of the last checkpoint, a health
score per layer, and how the norms moved across the run's checkpoints.

The weights are read straight from the checkpoint's ``state_dict`` (``torch.load(weights_only=True)``, no model
built): a weight is every ``*.weight`` tensor of 2 or more dimensions (``Linear``: 2, ``Conv1d/2d/3d``: 3-5;
normalisation layers' 1-D scales and embedding-free biases are left out). Statistics and the health score are
`lightning_probes.functional.weight_statistics` and `lightning_probes.functional.health_score`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from lightning_probes.functional import health_score, weight_statistics
from lightning_probes.io import read_checkpoint
from lightning_probes.naming import clean_name

__all__ = ["evolution_figure", "layer_weights", "run_evolution", "run_weights", "weights_figure"]

#: Norms followed across checkpoints.
EVOLUTION_STATS = ("l2", "spectral_norm")


def layer_weights(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``{layer name: weight}`` of every ``Linear`` / ``Conv`` weight in a state dict (``*.weight`` with >= 2 dims),
    in the state dict's order; the layer name drops ``.weight`` (``net.fc1``)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".weight") and torch.is_tensor(value) and value.ndim >= 2 and value.is_floating_point():
            out[clean_name(key[: -len(".weight")])] = value
    return out


def run_weights(checkpoint: str, trust: bool = False) -> dict[str, Any]:
    """Statistics and health of every layer weight of one checkpoint.

    Returns:
        ``{"checkpoint", "epoch", "global_step", "layers": {layer: {statistics..., health, density, scale,
        tails}}, "summary": {"mean_health", "min_health", "weakest_layer", "layers"}}``.
    """
    loaded = read_checkpoint(checkpoint, "RUN checkpoint", trust=trust)
    layers = {}
    for name, weight in layer_weights(loaded["state_dict"]).items():
        stats = weight_statistics(weight)
        layers[name] = {**stats, **health_score(stats)}
    healths = {name: values["health"] for name, values in layers.items()}
    weakest = min(healths, key=healths.get) if healths else None
    return {
        "checkpoint": checkpoint,
        "epoch": loaded.get("epoch"),
        "global_step": loaded.get("global_step"),
        "layers": layers,
        "summary": {
            "layers": len(layers),
            "mean_health": float(np.mean(list(healths.values()))) if healths else math.nan,
            "min_health": healths[weakest] if weakest else math.nan,
            "weakest_layer": weakest,
        },
    }


def run_evolution(checkpoints: Sequence[str], trust: bool = False) -> list[dict[str, Any]]:
    """The norms of every layer weight at each checkpoint, in training order, one entry per distinct
    ``(epoch, global_step)`` (``last.ckpt`` usually repeats the latest epoch checkpoint and is then left out)."""
    seen, out = set(), []
    for path in checkpoints:
        loaded = read_checkpoint(path, "RUN checkpoint", trust=trust)
        key = (loaded.get("epoch"), loaded.get("global_step"))
        if key in seen:
            continue
        seen.add(key)
        layers = {}
        for name, weight in layer_weights(loaded["state_dict"]).items():
            stats = weight_statistics(weight)
            layers[name] = {k: stats[k] for k in EVOLUTION_STATS}
        out.append({"checkpoint": os.path.basename(path), "epoch": key[0], "global_step": key[1], "layers": layers})
    out.sort(key=lambda e: (e["global_step"] is None, e["global_step"] or 0))
    return out


def weights_figure(per_model: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Per-layer spectral norm, stable rank, kurtosis and health of every model (one line per model)."""
    panels = ("spectral_norm", "stable_rank", "kurtosis", "sparsity", "std", "health")
    fig = Figure(figsize=(12, 7), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, stat in zip(axes, panels):
        for name, result in per_model.items():
            layers = result["layers"]
            values = [layers[layer][stat] for layer in layers]
            ax.plot(range(len(values)), values, marker="o", linewidth=1, label=name)
            ax.set_xticks(range(len(layers)), list(layers), rotation=45, ha="right", fontsize=7)
        ax.set_title(stat, fontsize=10)
        if stat in ("spectral_norm",):
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("Weights of the last checkpoint, per layer (health: see analysis_results.json)")
    return fig


def evolution_figure(evolution: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """L2 and spectral norms of each layer across checkpoints, one panel per statistic, a colour per model."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, len(EVOLUTION_STATS))
    colours = [f"C{i % 10}" for i in range(len(evolution))]
    for ax, stat in zip(axes, EVOLUTION_STATS):
        for colour, (name, entries) in zip(colours, evolution.items()):
            epochs = [e["epoch"] for e in entries]
            layers = list(entries[0]["layers"]) if entries else []
            for k, layer in enumerate(layers):
                ax.plot(epochs, [e["layers"].get(layer, {}).get(stat, math.nan) for e in entries], marker=".",
                        color=colour, alpha=0.4 + 0.6 * (k + 1) / len(layers), linewidth=1,
                        label=name if k == len(layers) - 1 else None)
        ax.set_xlabel("epoch of the checkpoint")
        ax.set_title(f"{stat} of each layer (darker: deeper)", fontsize=10)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("How the weight norms evolved across each run's checkpoints")
    return fig
