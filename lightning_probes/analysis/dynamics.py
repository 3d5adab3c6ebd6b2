"""Training dynamics of finished runs, from their logged epoch metrics (``train/loss``, ``val/loss``,
``val/acc``): epochs to convergence, overfitting index, stability, peak val/acc and its epoch, final gap
(`lightning_probes.functional.training_dynamics` states each formula)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lightning_probes.functional import training_dynamics

__all__ = ["REQUIRED", "dynamics_figure", "run_dynamics"]

#: The curves the summaries need.
REQUIRED = ("train/loss", "val/loss", "val/acc")


def run_dynamics(epochs: pd.DataFrame) -> tuple[dict[str, Any] | None, str]:
    """The summaries of one run's epoch table (index ``epoch``).

    Returns:
        ``(summaries with "curves", note)``, or ``(None, why not)`` when a required curve is missing.
    """
    missing = [c for c in REQUIRED if c not in epochs.columns or not epochs[c].notna().any()]
    if epochs.empty or missing:
        return None, f"no {', '.join(missing or REQUIRED)} epoch values in the run's logs"
    table = epochs.sort_index()
    result = training_dynamics(table.index.tolist(), table["train/loss"], table["val/loss"], table["val/acc"])
    note = "" if result["stability_epochs"] >= 10 else (
        f"stability from the last {result['stability_epochs']} val/loss values (fewer than 10 epochs)")
    result["note"] = note
    result["curves"] = {"epoch": table.index.tolist(),
                        **{c: [None if math.isnan(v) else float(v) for v in table[c]] for c in REQUIRED}}
    return result, note


def dynamics_figure(per_model: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Train and val loss (left) and val/acc (right) per epoch, a colour per model; the peak marked."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for i, (name, result) in enumerate(per_model.items()):
        curves, colour = result["curves"], f"C{i % 10}"
        epochs = np.asarray(curves["epoch"])
        as_float = {k: np.asarray([np.nan if v is None else v for v in curves[k]], dtype=float) for k in REQUIRED}
        loss_ax.plot(epochs, as_float["train/loss"], color=colour, linestyle="--", linewidth=1)
        loss_ax.plot(epochs, as_float["val/loss"], color=colour, linewidth=1.5, label=name)
        acc_ax.plot(epochs, as_float["val/acc"], color=colour, linewidth=1.5, label=name)
        if result["peak_epoch"] is not None:
            acc_ax.scatter([result["peak_epoch"]], [result["peak_val_acc"]], color=colour, marker="*", s=80)
    loss_ax.set_title("loss (solid: val, dashed: train)", fontsize=10)
    acc_ax.set_title("val/acc (star: peak)", fontsize=10)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
    acc_ax.legend(fontsize=7)
    fig.suptitle("Training dynamics")
    return fig
