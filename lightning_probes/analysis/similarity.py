"""Which runs learned alike: a 2-D PCA map of the runs' per-layer weight statistics and, with data, the linear CKA
between the runs' penultimate-layer features on the same samples."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch
from matplotlib.figure import Figure

from lightning_probes.functional import WEIGHT_STATISTICS, cka_matrix, pca_map

__all__ = ["cka_section", "draw_map", "pca_section", "similarity_figure", "weight_features"]

#: The weight statistics in the feature vector (``l1`` and ``l2`` grow with a layer's size; the map is meant for
#: the shape of the weights, so it uses the size-free ones and the spectral norm).
FEATURE_STATS = tuple(s for s in WEIGHT_STATISTICS if s not in ("l1", "l2"))


def weight_features(per_model: Mapping[str, Mapping[str, Any]]) -> tuple[np.ndarray, list[str], str]:
    """One feature vector per model from its per-layer weight statistics.

    The layers every model has (same name and shape) give ``<layer>/<stat>`` features; when the models share no
    layer (other architectures), the mean and the maximum over each model's layers of every statistic stand in.

    Returns:
        ``(features (models, columns), column names, basis)`` with ``basis`` ``"shared layers"`` or
        ``"layer means and maxima (no layer shared by every model)"``.
    """
    names = list(per_model)
    layer_sets = [list(per_model[n]["layers"]) for n in names]
    first = per_model[names[0]]["layers"] if names else {}
    shared = [layer for layer in layer_sets[0] if all(
        layer in per_model[n]["layers"] and per_model[n]["layers"][layer]["shape"] == first[layer]["shape"]
        for n in names[1:])]
    if shared:
        columns = [f"{layer}/{stat}" for layer in shared for stat in FEATURE_STATS]
        rows = [[per_model[n]["layers"][layer][stat] for layer in shared for stat in FEATURE_STATS] for n in names]
        return np.asarray(rows, dtype=float), columns, "shared layers"
    columns = [f"{agg}/{stat}" for agg in ("mean", "max") for stat in FEATURE_STATS]
    rows = []
    for n in names:
        table = np.asarray([[per_model[n]["layers"][layer][stat] for stat in FEATURE_STATS]
                            for layer in per_model[n]["layers"]], dtype=float)
        rows.append(np.concatenate([np.nanmean(table, axis=0), np.nanmax(table, axis=0)]))
    return np.asarray(rows, dtype=float), columns, "layer means and maxima (no layer shared by every model)"


def pca_section(per_model: Mapping[str, Mapping[str, Any]]) -> tuple[Optional[dict[str, Any]], str]:
    """The PCA map of the models (``coords`` per model, explained variance, the features used), or ``None`` and
    why (fewer than 2 models with weights, or no statistic that varies)."""
    if len(per_model) < 2:
        return None, "needs at least 2 runs with checkpoints"
    features, columns, basis = weight_features(per_model)
    try:
        out = pca_map(features)
    except ValueError as err:
        return None, str(err)
    coords = {name: [float(v) for v in row] for name, row in zip(per_model, out["coords"])}
    return {"coords": coords, "explained_variance_ratio": out["explained"], "basis": basis,
            "features": [columns[i] for i in out["columns"]]}, ""


def cka_section(penultimate: Mapping[str, Optional[torch.Tensor]]) -> tuple[Optional[dict[str, Any]], str]:
    """Linear CKA between the models' penultimate-layer features, or ``None`` and why."""
    usable = {n: f for n, f in penultimate.items() if f is not None}
    if len(usable) < 2:
        return None, "needs data (--config) and at least 2 models with a final Linear layer"
    matrix = cka_matrix(list(usable.values()))
    return {"models": list(usable), "matrix": [[None if math.isnan(v) else float(v) for v in row] for row in matrix],
            "features": {n: int(f.shape[1]) for n, f in usable.items()}}, ""


def similarity_figure(pca: Optional[Mapping[str, Any]], cka: Optional[Mapping[str, Any]]) -> Figure:
    """The PCA map (left) and the CKA heatmap (right); a panel is left empty with its reason when missing."""
    fig = Figure(figsize=(12, 5), layout="constrained")
    map_ax, cka_ax = fig.subplots(1, 2)
    draw_map(map_ax, pca)
    if cka is None:
        cka_ax.text(0.5, 0.5, "CKA needs data (--config)", ha="center", va="center")
        cka_ax.set_axis_off()
    else:
        matrix = np.asarray([[np.nan if v is None else v for v in row] for row in cka["matrix"]], dtype=float)
        image = cka_ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ticks = range(len(cka["models"]))
        cka_ax.set_xticks(ticks, cka["models"], rotation=45, ha="right", fontsize=7)
        cka_ax.set_yticks(ticks, cka["models"], fontsize=7)
        if len(matrix) <= 12:
            for i in range(len(matrix)):
                for j in range(len(matrix)):
                    cka_ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(image, ax=cka_ax, shrink=0.8)
        cka_ax.set_title("linear CKA of penultimate-layer features", fontsize=10)
    fig.suptitle("Similarity of the runs")
    return fig


def draw_map(ax: Any, pca: Optional[Mapping[str, Any]]) -> None:
    """Draw the PCA map of the runs on ``ax`` (or the reason it is missing)."""
    if pca is None:
        ax.text(0.5, 0.5, "PCA map needs 2 or more runs with checkpoints", ha="center", va="center")
        ax.set_axis_off()
        return
    for i, (name, (x, y)) in enumerate(pca["coords"].items()):
        ax.scatter(x, y, color=f"C{i % 10}", s=40)
        ax.annotate(name, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    explained = pca["explained_variance_ratio"] + [0.0] * (2 - len(pca["explained_variance_ratio"]))
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f}%)")
    ax.set_title(f"PCA of weight statistics ({pca['basis']})", fontsize=9)
