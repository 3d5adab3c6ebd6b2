"""Figures as pure functions: arrays in, a ``matplotlib.figure.Figure`` out (no pyplot, no global state); and
`colormapped`, a heatmap as an RGB array for image loggers, without matplotlib's drawing (milliseconds)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

#: Colour of NaN cells in `colormapped` images (light grey).
NAN_RGB = (211, 211, 211)


def colormapped(
    matrix: np.ndarray,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    cmap: str = "viridis",
    min_size: int = 128,
    max_size: int = 1024,
) -> np.ndarray:
    """A matrix as an ``(H, W, 3)`` uint8 RGB image through a matplotlib colormap, for ``add_image``.

    No figure is drawn: the values are scaled to ``[vmin, vmax]`` (default: their finite range) and looked up in
    the colormap. A matrix smaller than ``min_size`` pixels on a side has its cells repeated to a whole number of
    pixels each; one larger than ``max_size`` is shown every ``ceil(size / max_size)``-th row and column. NaN
    cells are `NAN_RGB`.

    Example:
        >>> colormapped(np.eye(3), 0, 1, min_size=6).shape
        (6, 6, 3)
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"Expected a 2-D matrix, but got shape {matrix.shape}")
    stride = max(1, -(-max(matrix.shape) // max_size))
    matrix = matrix[::stride, ::stride].astype(np.float32)
    finite = np.isfinite(matrix)
    low = vmin if vmin is not None else (float(matrix[finite].min()) if finite.any() else 0.0)
    high = vmax if vmax is not None else (float(matrix[finite].max()) if finite.any() else 1.0)
    scaled = (np.where(finite, matrix, low) - low) / (high - low if high > low else 1.0)
    table = (colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    image = table[np.clip(scaled * 255 + 0.5, 0, 255).astype(np.intp)]
    image[~finite] = NAN_RGB
    repeat = max(1, -(-min_size // max(1, max(matrix.shape))))
    if repeat > 1:
        image = image.repeat(repeat, axis=0).repeat(repeat, axis=1)
    return np.ascontiguousarray(image)


def grouped_bars(
    labels: Sequence[str],
    groups: Mapping[str, Mapping[str, Sequence[float]]],
    title: str,
    log_scale: bool = True,
) -> Figure:
    """One panel per statistic, bars grouped per label, one bar per series.

    Args:
        labels: Names along the x axis (layers).
        groups: ``{panel title: {series name: values per label}}``.
        title: Figure title.
        log_scale: Logarithmic y axis (gradient magnitudes span decades).
    """
    n_panels = len(groups)
    fig = Figure(figsize=(max(6.0, 0.55 * len(labels) + 2), 3.2 * n_panels), layout="constrained")
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    x = np.arange(len(labels))
    for ax, (panel, series) in zip(axes, groups.items()):
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            values = np.asarray(values, dtype=float)
            ax.bar(x + (i - (len(series) - 1) / 2) * width, np.where(np.isfinite(values), values, 0), width, label=name)
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(panel, fontsize=9)
        if log_scale:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def line_panels(x: Sequence[float], series: Mapping[str, Sequence[float]], xlabel: str, title: str) -> Figure:
    """One small line plot per named series, sharing the x axis; without any series, one empty panel that says
    so (a figure is still drawn)."""
    n = len(series)
    if n == 0:
        fig = Figure(figsize=(7, 2.2), layout="constrained")
        ax = fig.subplots()
        ax.text(0.5, 0.5, "nothing to draw", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        fig.suptitle(title)
        return fig
    fig = Figure(figsize=(7, 2.2 * n), layout="constrained")
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, values) in zip(axes, series.items()):
        ax.plot(np.asarray(x), np.asarray(values, dtype=float), marker=".", linewidth=1)
        ax.set_ylabel(name, fontsize=8)
    axes[-1].set_xlabel(xlabel)
    fig.suptitle(title)
    return fig


def heatmap(
    matrix: np.ndarray,
    title: str,
    xlabels: Optional[Sequence[str]] = None,
    ylabels: Optional[Sequence[str]] = None,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    cmap: str = "viridis",
    annotate: bool = False,
    ax=None,
) -> Figure:
    """A labelled heatmap; NaN cells (masked) are left blank."""
    matrix = np.asarray(matrix, dtype=float)
    fig = ax.figure if ax is not None else Figure(figsize=(1.0 + 0.5 * matrix.shape[1], 0.8 + 0.45 * matrix.shape[0]),
                                                   constrained_layout=True)
    ax = ax if ax is not None else fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8)
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=60, ha="right", fontsize=7)
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
    if annotate and matrix.size <= 150:
        low, high = image.get_clim()
        middle = (low + high) / 2
        finite = matrix[np.isfinite(matrix)]
        counts = finite.size > 0 and bool(np.all(finite == np.round(finite)))  # counts: whole numbers, not 2.5e+02
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.0f}" if counts else f"{value:.2g}", ha="center", va="center", fontsize=6,
                        in_layout=False,  # inside the axes: the layout engine need not measure them
                        color="k" if value > middle else "w")
    ax.set_title(title, fontsize=9)
    return fig


#: Gradient-sign map colours, indexed by category: 0 |g| > threshold, 1 small negative, 2 small positive, 3 zero.
SIGN_MAP_COLORS = ListedColormap(["white", "red", "green", "black"])


def sign_map(
    categories: np.ndarray,
    row_labels: Sequence[int],
    title: str,
    column_range: Optional[tuple[int, int]] = None,
) -> Figure:
    """Gradient-sign map: rows are epochs, columns gradient entries; colours from `SIGN_MAP_COLORS`."""
    categories = np.asarray(categories)
    start, stop = column_range if column_range is not None else (0, categories.shape[1])
    shown = categories[:, start:stop]
    fig = Figure(figsize=(10, 1.2 + 0.25 * len(row_labels)), layout="constrained")
    ax = fig.subplots()
    ax.imshow(shown, cmap=SIGN_MAP_COLORS, vmin=-0.5, vmax=3.5, aspect="auto", interpolation="nearest",
              extent=(start - 0.5, stop - 0.5, len(row_labels) - 0.5, -0.5))
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels], fontsize=7)
    ax.set_ylabel("epoch")
    ax.set_xlabel("gradient entry (first layer to last, subsampled)")
    ax.set_title(title + "   white |g|>thr, red small g<0, green small g>0, black g=0", fontsize=9)
    return fig
