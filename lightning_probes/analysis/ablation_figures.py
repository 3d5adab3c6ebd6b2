"""Figures of an ablation run (`lightning_probes.analysis.ablation`): result dicts in, ``Figure`` objects out.

No pyplot, no global state: each function builds a ``matplotlib.figure.Figure`` that the caller renders
(`lightning_probes.io.render_png`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from lightning_probes.plotting import heatmap

__all__ = [
    "checkpoint_collapse_figure",
    "collapse_figure",
    "confusion_figure",
    "default_figure_fractions",
    "deviation_figure",
    "write_figures",
]

_COLORS = {"high": "tab:red", "low": "tab:blue", "random": "tab:gray"}


def _array(values: Sequence[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _fraction_grid(rows: int) -> tuple[Figure, np.ndarray]:
    """A figure with one row of two panels per target, sharing the fraction axis."""
    fig = Figure(figsize=(9, 1.0 + 2.3 * rows), layout="constrained")
    return fig, fig.subplots(rows, 2, squeeze=False, sharex=True)


def _finish_fraction_grid(fig: Figure, axes: np.ndarray, title: str) -> Figure:
    for ax in axes[-1]:
        ax.set_xlabel("fraction of units dropped")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title)
    return fig


def deviation_figure(fractions: Sequence[float], targets: Mapping[str, Mapping[str, Any]], title: str) -> Figure:
    """Accuracy and loss deviation from the intact network vs the fraction dropped, one row per target.

    Args:
        fractions: The fractions (x axis).
        targets: ``{layer or "all_layers": section with "high", "low", "random"}``.
        title: Figure title.
    """
    fig, axes = _fraction_grid(len(targets))
    x = np.asarray(fractions, dtype=float)
    for row, (target, section) in zip(axes, targets.items()):
        for ax, metric in zip(row, ("acc", "loss")):
            for order in ("high", "low"):
                ax.plot(x, _array(section[order][f"{metric}_deviation"]), marker=".", color=_COLORS[order],
                        label=f"{order} alignment first")
            mean = _array(section["random"][f"{metric}_deviation_mean"])
            std = np.nan_to_num(_array(section["random"][f"{metric}_deviation_std"]))
            ax.plot(x, mean, marker=".", color=_COLORS["random"], label="random")
            ax.fill_between(x, mean - std, mean + std, color=_COLORS["random"], alpha=0.25, linewidth=0)
            ax.axhline(0, color="k", linewidth=0.5)
            ax.set_ylabel(f"{metric} - intact", fontsize=8)
            ax.set_title(target, fontsize=9)
    return _finish_fraction_grid(fig, axes, title)


def confusion_figure(
    fractions: Sequence[float],
    section: Mapping[str, Any],
    chosen: Sequence[int],
    num_classes: int,
    title: str,
) -> Figure:
    """Confusion counts (top row) and mean confidence per cell (bottom row) at the ``chosen`` fraction indices.

    Empty cells, and cells with too few predictions for a mean confidence (``null`` in the result), are blank.
    """
    fig = Figure(figsize=(1.2 + 3.6 * len(chosen), 6.6), layout="constrained")
    axes = fig.subplots(2, len(chosen), squeeze=False)
    labels = [str(c) for c in range(num_classes)]
    for column, index in enumerate(chosen):
        counts = np.asarray(section["confusion"][index], dtype=float)
        counts[counts == 0] = np.nan  # empty cells blank
        confidence = np.array([_array(row) for row in section["confidence"][index]])
        heatmap(counts, f"counts, {fractions[index]:g} dropped", labels, labels, annotate=True, vmin=0,
                ax=axes[0, column])
        heatmap(confidence, f"mean confidence, {fractions[index]:g} dropped", labels, labels, vmin=0, vmax=1,
                annotate=True, ax=axes[1, column])
        for ax in axes[:, column]:
            ax.set_xlabel("predicted", fontsize=8)
            ax.set_ylabel("true", fontsize=8)
    fig.suptitle(title)
    return fig


def collapse_figure(fractions: Sequence[float], targets: Mapping[str, Mapping[str, Any]], title: str) -> Figure:
    """Entropy of the predicted classes and share of the top class vs fraction; the top class is written at
    each point of the ``high`` and ``low`` curves."""
    fig, axes = _fraction_grid(len(targets))
    x = np.asarray(fractions, dtype=float)
    for row, (target, section) in zip(axes, targets.items()):
        for ax, metric in zip(row, ("entropy", "top_share")):
            for order in ("high", "low", "random"):
                key = f"{metric}_mean" if order == "random" else metric
                collapse = section[order]["collapse"]
                y = _array([c[key] for c in collapse])
                ax.plot(x, y, marker=".", color=_COLORS[order], label=order)
                if metric == "top_share" and order != "random":
                    for xi, yi, c in zip(x, y, collapse):
                        if np.isfinite(yi):
                            ax.annotate(str(c["top_class"]), (xi, yi), fontsize=6, color=_COLORS[order],
                                        xytext=(2, 2), textcoords="offset points")
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("normalised entropy" if metric == "entropy" else "top-class share", fontsize=8)
            ax.set_title(target, fontsize=9)
    return _finish_fraction_grid(fig, axes, title)


def checkpoint_collapse_figure(
    fractions: Sequence[float],
    checkpoints: Sequence[str],
    comparison: Mapping[str, Mapping[str, Any]],
    num_classes: int,
    title: str,
) -> Figure:
    """The most-predicted class of each checkpoint (rows) at each fraction (columns), one panel per order.

    Colour is the class, the number written in a cell its share of the predictions; a column of one colour
    means every checkpoint collapses onto the same class.

    Args:
        fractions: The fractions.
        checkpoints: Checkpoint names (rows).
        comparison: ``{order: {"top_class", "top_share", "agreement", ...}}`` of one target
            (`compare_checkpoints`).
        num_classes: Number of classes (colours).
        title: Figure title.
    """
    orders = list(comparison)
    fig = Figure(figsize=(1.5 + 0.6 * len(fractions) * len(orders), 1.6 + 0.35 * len(checkpoints)),
                 layout="constrained")
    axes = fig.subplots(1, len(orders), squeeze=False)[0]
    base = [f"C{i % 10}" for i in range(num_classes)]
    cmap = ListedColormap(base)
    norm = BoundaryNorm(np.arange(-0.5, num_classes + 0.5), num_classes)
    for ax, order in zip(axes, orders):
        classes = np.asarray(comparison[order]["top_class"], dtype=float)
        classes[classes < 0] = np.nan
        shares = np.array([_array(row) for row in comparison[order]["top_share"]])
        ax.imshow(np.ma.masked_invalid(classes), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for (i, j), value in np.ndenumerate(classes):
            if np.isfinite(value):
                ax.text(j, i, f"{int(value)}\n{shares[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
        agreement = comparison[order]["agreement"]
        ax.set_xticks(range(len(fractions)),
                      [f"{f:g}\n{a:.2f}" if a == a else f"{f:g}" for f, a in zip(fractions, agreement)], fontsize=6)
        ax.set_yticks(range(len(checkpoints)), checkpoints, fontsize=6)
        ax.set_xlabel("fraction dropped / agreement", fontsize=7)
        ax.set_title(order, fontsize=9)
    fig.suptitle(title)
    return fig


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in name)


def default_figure_fractions(fractions: Sequence[float]) -> list[int]:
    """Indices of the fractions shown in confusion figures by default: the one nearest 0.5 and the largest."""
    middle = min(range(len(fractions)), key=lambda i: abs(fractions[i] - 0.5))
    return sorted({middle, len(fractions) - 1})


def write_figures(
    directory: str,
    analyses: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    comparison: Mapping[str, Any] | None = None,
    chosen: Sequence[int] | None = None,
) -> list[str]:
    """Render every figure of an ablation run as PNG files under ``directory``.

    One checkpoint: ``deviation.png``, ``collapse.png`` and ``confusion_<target>_<order>.png`` in ``directory``;
    several: the same in ``directory/<checkpoint name>/``, plus ``collapse_checkpoints_<target>.png`` from
    ``comparison``.

    Args:
        directory: Where the figures go (created).
        analyses: `ablate` results, one per checkpoint.
        names: Checkpoint names (file stems).
        comparison: `compare_checkpoints` result (several checkpoints).
        chosen: Indices of the fractions shown in the confusion figures (default `default_figure_fractions`).

    Returns:
        The paths written.
    """
    from lightning_probes.analysis.ablation_checkpoints import targets_of
    from lightning_probes.io import atomic_write_bytes, render_png

    written = []

    def save(fig: Figure, path: str) -> None:
        atomic_write_bytes(path, render_png(fig))
        written.append(path)

    for analysis, name in zip(analyses, names):
        folder = directory if len(analyses) == 1 else os.path.join(directory, _safe(name))
        fractions, targets = analysis["fractions"], targets_of(analysis)
        num_classes = len(analysis["intact"]["confusion"])
        indices = list(chosen) if chosen is not None else default_figure_fractions(fractions)
        save(deviation_figure(fractions, targets, f"{name}: deviation from the intact network"),
             os.path.join(folder, "deviation.png"))
        save(collapse_figure(fractions, targets, f"{name}: collapse of the predicted classes"),
             os.path.join(folder, "collapse.png"))
        for target, section in targets.items():
            for order in ("high", "low", "random"):
                what = "pooled over the repeats" if order == "random" else "alignment first"
                save(confusion_figure(fractions, section[order], indices, num_classes,
                                      f"{name}: {target}, {order} {what}"),
                     os.path.join(folder, f"confusion_{_safe(target)}_{order}.png"))
    if comparison is not None:
        num_classes = len(analyses[0]["intact"]["confusion"])
        for target, orders in comparison["targets"].items():
            save(checkpoint_collapse_figure(comparison["fractions"], comparison["checkpoints"], orders, num_classes,
                                            f"{target}: most-predicted class across checkpoints"),
                 os.path.join(directory, f"collapse_checkpoints_{_safe(target)}.png"))
    return written
