"""A study's figures (matplotlib), drawn from ``summary.json`` and the trials' epoch metrics.

- ``curves.png``: one row per setting, loss and accuracy: every seed's train and val curve faint, their mean bold;
- ``smoothed.png``: every setting's smoothed (moving average, ``smoothing`` epochs) mean of the validation loss
  and of the monitor in one panel each;
- ``test.png``: every setting's mean of each compared metric with its sample std as error bars, seeds as dots;
- ``gradient_flow.png`` (only when the trials ran a ``GradientStatsMonitor``): per setting, the mean ``|grad|`` of
  each weight tensor in network order with its std as error bars, first window vs last window, log scale; drawn
  from ``summary.json``'s ``gradient_flow`` section (the seeds' average of every trial's ``gradient_flow.json``).

``write_figures`` saves them atomically as PNG in ``<output>/figures/`` and adds them to the TensorBoard run
``<output>/summary/`` (``SummaryWriter.add_figure``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_probes.functional.statistics import moving_average
from lightning_probes.io import atomic_write_bytes, render_png
from lightning_probes.studies.gradient_flow import GRADIENT_FLOW_WINDOWS, plotted_layers
from lightning_probes.studies.trials import setting_key, setting_label

log = logging.getLogger(__name__)

__all__ = ["curves_figure", "gradient_flow_figure", "smoothed_figure", "test_figure", "write_figures"]


def curves_figure(summary: Mapping[str, Any], results: Sequence[Any]) -> Any:
    """Per setting (rows) loss and accuracy (columns): seeds faint, mean bold, train and val."""
    import matplotlib.pyplot as plt

    settings = summary["settings"]
    kinds = ("loss", "acc")
    fig, axes = plt.subplots(len(settings), 2, figsize=(10, 2.6 * len(settings) + 0.6), squeeze=False,
                             sharex=True)
    by_setting: dict[str, list[Any]] = {}
    for r in results:
        if r.status == "finished":
            by_setting.setdefault(setting_key(r.params), []).append(r)
    for row, setting in enumerate(settings):
        trials = by_setting.get(setting_key(setting["params"]), [])
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            for stage, color in (("train", "tab:blue"), ("val", "tab:orange")):
                metric = f"{stage}/{kind}"
                for r in trials:
                    if metric in r.epochs:
                        series = r.epochs[metric].dropna()
                        ax.plot(series.index, series.to_numpy(), color=color, alpha=0.25, linewidth=0.8)
                mean = setting["epochs"].get(metric, {}).get("mean")
                if mean:
                    ax.plot(np.arange(len(mean)), mean, color=color, linewidth=2.0, label=f"{metric} (mean)")
            ax.set_title(f"{setting_label(setting['params'])}: {kind}", fontsize=9)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.legend(fontsize=7)
            if row == len(settings) - 1:
                ax.set_xlabel("epoch")
    fig.suptitle(f"{summary.get('name', '')}: seeds (faint) and their mean (bold)")
    fig.tight_layout()
    return fig


def smoothed_figure(summary: Mapping[str, Any], smoothing: int) -> Any:
    """Every setting's smoothed mean of ``val/loss`` and of the monitor, one panel each."""
    import matplotlib.pyplot as plt

    metrics = ["val/loss"] + ([summary["monitor"]] if summary["monitor"] != "val/loss" else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for setting in summary["settings"]:
            mean = setting["epochs"].get(metric, {}).get("mean")
            if not mean:
                continue
            smooth = moving_average(mean, smoothing)
            style = {"linewidth": 2.5} if setting.get("best") else {"linewidth": 1.2}
            ax.plot(np.arange(len(smooth)), smooth, label=setting_label(setting["params"]), **style)
        ax.set_title(f"{metric}: mean over seeds, moving average of {smoothing}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def test_figure(summary: Mapping[str, Any]) -> Any:
    """Mean and sample std (error bars) of every test metric (or final monitor value) per setting; seeds as dots."""
    import matplotlib.pyplot as plt

    settings = summary["settings"]
    table = "test" if summary["compare"]["source"] == "test" else "final"
    metrics = sorted({m for s in settings for m in s[table]}) if table == "test" else [summary["monitor"]]
    metrics = metrics or [summary["monitor"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 1.2 * len(settings) + 2) * len(metrics) / 1.5, 4),
                             squeeze=False)
    labels = [setting_label(s["params"]) for s in settings]
    x = np.arange(len(settings))
    for ax, metric in zip(axes[0], metrics):
        means = np.array([s[table].get(metric, {}).get("mean", np.nan) for s in settings], dtype=float)
        stds = np.array([s[table].get(metric, {}).get("std", np.nan) for s in settings], dtype=float)
        colors = ["tab:green" if s.get("best") else "tab:gray" for s in settings]
        ax.bar(x, means, yerr=np.nan_to_num(stds), color=colors, alpha=0.6, capsize=4)
        for i, s in enumerate(settings):
            values = s[table].get(metric, {}).get("values", [])
            ax.scatter(np.full(len(values), i), values, color="black", s=10, zorder=3)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{metric} ({table}): mean ± std over seeds", fontsize=9)
        finite = means[np.isfinite(means)]
        if finite.size and metric.endswith(("acc", "f1")):
            ax.set_ylim(max(0.0, float(np.nanmin(finite - np.nan_to_num(stds[np.isfinite(means)]))) - 0.05), None)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def _merged_order(orders: Sequence[Sequence[str]]) -> list[str]:
    """One sequence holding every name, keeping each input's own order where they agree (a new name goes right
    after the name before it in its own sequence): a shared layer axis for networks with different layers."""
    merged: list[str] = []
    for order in orders:
        position = 0
        for name in order:
            if name in merged:
                position = merged.index(name) + 1
            else:
                merged.insert(position, name)
                position += 1
    return merged


def gradient_flow_figure(summary: Mapping[str, Any]) -> Any:
    """First vs last gradient-flow window (two panels, shared log y axis): per setting, one line over its weight
    tensors in network order, mean ``|grad|`` (over the window's entries, then over seeds) with the std of
    ``|grad|`` as error bars.

    Settings with different layers (batch norm) share the x axis: every layer of any setting, each setting's own
    order kept; a setting's line joins only its own layers. A lower error bar that would reach zero or below ends
    at the bottom of the axes.

    Args:
        summary: ``summary.json`` with its ``gradient_flow`` section.
    """
    import matplotlib.pyplot as plt

    settings = summary["gradient_flow"]["settings"]
    picked = [[s["layers"][i] for i in plotted_layers(s["layers"])] for s in settings]
    axis = _merged_order(picked)
    values = []  # per setting: x, and per window (mean, std) over its plotted layers
    for setting, layers in zip(settings, picked):
        index = [setting["layers"].index(name) for name in layers]
        x = np.array([axis.index(name) for name in layers], dtype=float)
        stats = {w: (np.array([setting[w]["mean"][i] for i in index], dtype=float),
                     np.array([setting[w]["std"][i] for i in index], dtype=float)) for w in GRADIENT_FLOW_WINDOWS}
        values.append((x, stats))
    positive = [v for _, stats in values for mean, std in stats.values()
                for v in (*mean, *(mean - std), *(mean + std)) if np.isfinite(v) and v > 0]
    bottom, top = (min(positive) / 2, max(positive) * 2) if positive else (1e-8, 1.0)
    width = max(5.0, 0.45 * len(axis) + 2.5)
    fig, axes = plt.subplots(1, len(GRADIENT_FLOW_WINDOWS), figsize=(2 * width, 4.6), sharey=True, squeeze=False)
    offsets = (np.arange(len(settings)) - (len(settings) - 1) / 2) * min(0.12, 0.6 / max(1, len(settings)))
    windows = {s.get("window") for s in settings}
    size = f"{windows.pop()} " if len(windows) == 1 and None not in windows else ""
    for ax, window in zip(axes[0], GRADIENT_FLOW_WINDOWS):
        for k, (setting, (x, stats)) in enumerate(zip(settings, values)):
            mean, std = stats[window]
            finite = np.isfinite(mean)
            std = np.where(np.isfinite(std), std, 0.0)
            lower = np.clip(np.minimum(std, mean - bottom), 0.0, None)
            ax.errorbar(x[finite] + offsets[k], mean[finite], yerr=[lower[finite], std[finite]], marker="o",
                        markersize=4, capsize=3, linewidth=1.2, elinewidth=0.8,
                        label=f"{setting_label(setting['params'])} (n={setting['n']})")
        ax.set_yscale("log")
        ax.set_ylim(bottom, top)
        ax.set_xticks(np.arange(len(axis)))
        ax.set_xticklabels(axis, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{window} {size}optimiser steps", fontsize=9)
        ax.grid(alpha=0.3, which="both", axis="y")
        ax.set_xlabel("layer (network order)")
    axes[0][0].set_ylabel("|grad|: mean ± std (mean over seeds)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{summary.get('name', '')}: gradient flow, first vs last window".lstrip(": "))
    fig.tight_layout()
    return fig


def sampled_figure(summary: Mapping[str, Any]) -> Any:
    """A study with ``sample:``: the monitor's final value of every finished trial against each drawn value."""
    import matplotlib.pyplot as plt

    keys = list(summary["grid_keys"])
    monitor = summary["monitor"]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.2 * max(len(keys), 1), 3.0), squeeze=False)
    finished = [s for s in summary["settings"] if s["n"]]
    for ax, key in zip(axes[0], keys):
        points = [(s["params"].get(key), s["final"].get(monitor, {}).get("mean", np.nan)) for s in finished]
        xs = [p[0] for p in points]
        ys = np.array([p[1] for p in points], dtype=float)
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            positive = all(x > 0 for x in xs)
            ax.scatter(xs, ys, s=8, alpha=0.6)
            if positive and xs and max(xs) / min(xs) > 50:
                ax.set_xscale("log")
        else:  # categorical: one column per value, jittered
            labels = sorted({str(x) for x in xs})
            pos = np.array([labels.index(str(x)) for x in xs], dtype=float)
            pos += np.random.default_rng(0).uniform(-0.15, 0.15, len(pos))
            ax.scatter(pos, ys, s=8, alpha=0.6)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key.rsplit(".", 1)[-1], fontsize=8)
        ax.set_ylabel(f"final {monitor}", fontsize=8)
    fig.suptitle(f"{summary.get('name', '')}: {len(finished)} sampled trials".lstrip(": "))
    fig.tight_layout()
    return fig


def hparams_figures(summary: Mapping[str, Any], results: Sequence[Any]) -> dict[str, Any]:
    """``parallel_coordinates`` and ``importance`` (``lightning_probes.studies.hparams_figures``), to draw."""
    from lightning_probes.studies.hparams_figures import importance_figure, parallel_coordinates_figure
    from lightning_probes.studies.importance import trial_points

    section = summary["importance"]
    keys = [k for k in section["keys"] if k != "seed"]
    columns, metric = trial_points(results, keys, section["monitor"])
    return {"parallel_coordinates": lambda: parallel_coordinates_figure(columns, metric, section["monitor"],
                                                                        summary.get("mode", "max")),
            "importance": lambda: importance_figure(section)}


def write_figures(output: str, summary: Mapping[str, Any], results: Sequence[Any], smoothing: int,
                  sampled: bool = False) -> list[str]:
    """Draw the figures, save them as PNG in ``<output>/figures/`` and add them to TensorBoard ``<output>/summary/``.

    ``gradient_flow`` is drawn only when ``summary`` has a ``gradient_flow`` section. A study with ``sample:``
    (``sampled``), one setting per trial, gets ``sampled`` (the monitor against each drawn value) instead of the
    per-setting ``curves``, ``smoothed`` and ``test``. TensorBoard tags are ``study/<figure>``.

    Returns:
        The PNG paths written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    if not summary["settings"] or summary["n_finished"] == 0:
        return []
    figures = {
        "curves": lambda: curves_figure(summary, results),
        "smoothed": lambda: smoothed_figure(summary, smoothing),
        "test": lambda: test_figure(summary),
    }
    if sampled:
        figures = {"sampled": lambda: sampled_figure(summary)}
    elif summary.get("gradient_flow"):
        figures["gradient_flow"] = lambda: gradient_flow_figure(summary)
    if summary.get("importance"):
        figures.update(hparams_figures(summary, results))
    paths = []
    writer = SummaryWriter(log_dir=os.path.join(output, "summary"))
    try:
        for name, draw in figures.items():
            fig = draw()
            try:
                path = os.path.join(output, "figures", f"{name}.png")
                atomic_write_bytes(path, render_png(fig))
                paths.append(path)
                writer.add_figure(f"study/{name}", fig, global_step=summary["n_finished"], close=False)
            finally:
                plt.close(fig)
    finally:
        writer.close()
    return paths
