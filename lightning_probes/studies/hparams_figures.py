"""Figures of what mattered across a study's trials: parallel coordinates and hyper-parameter importance.

``parallel_coordinates_figure`` draws one line per finished trial through one vertical axis per varied key and a last
axis for the monitor, coloured by the monitor (the best trials drawn last, on top). Numeric keys spanning more than a
decade with positive values spread logarithmically get a log axis (learning rates, weight decay), others a linear
one; categorical keys
(strings, dicts) get one evenly spaced tick per value. ``importance_figure`` draws the ``importance`` section of
``summary.json`` as bars.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["axis_positions", "importance_figure", "parallel_coordinates_figure"]


def _off_centre(t: np.ndarray) -> float:
    """How far the median sits from the middle of the range, as a share of the range."""
    return float(abs(np.median(t) - (t.min() + t.max()) / 2) / (t.max() - t.min()))


def _logarithmic(x: np.ndarray) -> bool:
    """A log axis for positive values spanning more than a decade and spread over it logarithmically: their median
    sits nearer the middle of the range in log10 than in linear units (a log-uniform learning rate, not a uniform
    dropout whose smallest draw happens to be 5e-5)."""
    if not ((x > 0).all() and x.max() / x.min() > 10):
        return False
    return _off_centre(np.log10(x)) < _off_centre(x)


def axis_positions(values: Sequence[Any]) -> tuple[np.ndarray, list[float], list[str]]:
    """Where each value sits on a parallel-coordinates axis in [0, 1], with the axis's tick positions and labels.

    Returns:
        ``(positions, ticks, labels)``.
    """
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)
    if numeric:
        x = np.asarray(values, dtype=float)
        log = _logarithmic(x)
        t = np.log10(x) if log else x
        low, high = float(t.min()), float(t.max())
        span = high - low if high > low else 1.0
        ticks = np.linspace(low, high, 3) if high > low else np.array([low])
        labels = [f"{10 ** v:.3g}" if log else f"{v:.3g}" for v in ticks]
        return (t - low) / span, [float((v - low) / span) for v in ticks], labels
    text = [v if isinstance(v, str) else repr(v) for v in values]
    levels = sorted(set(text))
    step = 1.0 / max(len(levels) - 1, 1)
    index = {label: i * step for i, label in enumerate(levels)}
    return np.array([index[t] for t in text]), [index[label] for label in levels], [s[:18] for s in levels]


def parallel_coordinates_figure(columns: Mapping[str, Sequence[Any]], metric: Sequence[float], monitor: str,
                                mode: str = "max") -> Any:
    """Every trial as a line across one axis per key and the monitor (see the module docstring).

    Args:
        columns: Key -> its value in each trial.
        metric: The monitor of each trial.
        monitor: Its name (the last axis).
        mode: ``max`` or ``min``: which end of the monitor is better (drawn on top).
    """
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    names = [*columns, monitor]
    y = np.asarray(metric, dtype=float)
    axes_data = [axis_positions(list(v)) for v in columns.values()] + [axis_positions(list(y))]
    positions = np.stack([a[0] for a in axes_data], axis=1)  # (trials, axes)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names)), 4.8))
    norm = colors.Normalize(vmin=float(y.min()), vmax=float(y.max()) if y.max() > y.min() else float(y.min()) + 1)
    cmap = plt.get_cmap("viridis" if mode == "max" else "viridis_r")
    order = np.argsort(y if mode == "max" else -y)  # the best last, on top
    alpha = 0.8 if len(y) <= 50 else max(0.15, 8.0 / math.sqrt(len(y)))
    xs = np.arange(len(names))
    for i in order:
        ax.plot(xs, positions[i], color=cmap(norm(y[i])), alpha=alpha, linewidth=0.8)
    for j, (_, ticks, labels) in enumerate(axes_data):
        ax.axvline(j, color="black", linewidth=0.8)
        for tick, label in zip(ticks, labels):
            ax.text(j + 0.03, tick, label, fontsize=7, va="center", ha="left",
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 0.5})
    ax.set_xticks(xs)
    ax.set_xticklabels([n.rsplit(".", 1)[-1] for n in names], rotation=20, ha="right")
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(names) - 0.6)
    ax.set_ylim(-0.05, 1.05)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=monitor, pad=0.01)
    ax.set_title(f"{len(y)} trials: every varied hyper-parameter against {monitor}")
    fig.tight_layout()
    return fig


def importance_figure(section: Mapping[str, Any]) -> Any:
    """Bars of the ``importance`` section: permutation importance ± std (sampled) or variance shares (grid)."""
    import matplotlib.pyplot as plt

    if "importance" in section:
        keys = list(section["importance"])
        values = [section["importance"][k]["mean"] for k in keys]
        errors = [section["importance"][k]["std"] for k in keys]
        xlabel = "drop of held-out r2 when shuffled"
        title = f"Permutation importance for {section['monitor']} (forest OOB r2 {section['oob_r2']:.2f})"
    else:
        keys = [*section["shares"], "interactions", "seeds"]
        values = [*section["shares"].values(), section["interactions"], section["seeds"]]
        values = [v if math.isfinite(v) else 0.0 for v in values]
        errors = None
        xlabel = "share of the variance"
        title = f"Variance of {section['monitor']} across the grid"
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(keys) + 1.4))
    rows = np.arange(len(keys))[::-1]
    ax.barh(rows, values, xerr=errors, color="tab:blue", alpha=0.8, capsize=3)
    ax.set_yticks(rows)
    ax.set_yticklabels([k.rsplit(".", 1)[-1] for k in keys])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
