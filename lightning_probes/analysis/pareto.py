"""The Pareto front of finished runs: peak val/acc (higher is better) against overfitting index (lower is
better); a run is on the front when no other is at least as good on both and better on one
(`lightning_probes.functional.pareto_front`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lightning_probes.functional import pareto_front

__all__ = ["pareto_figure", "run_pareto"]


def run_pareto(dynamics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"objectives", "points": {run: {peak_val_acc, overfitting_index, on_front}}, "front": [runs]}`` over the
    runs with both numbers."""
    names = list(dynamics)
    up = [dynamics[n]["peak_val_acc"] for n in names]
    down = [dynamics[n]["overfitting_index"] for n in names]
    front = pareto_front(up, down)
    points = {n: {"peak_val_acc": u, "overfitting_index": d, "on_front": bool(f)}
              for n, u, d, f in zip(names, up, down, front)}
    return {"objectives": {"peak_val_acc": "max", "overfitting_index": "min"}, "points": points,
            "front": [n for n, f in zip(names, front) if f]}


def pareto_figure(result: Mapping[str, Any]) -> Figure:
    """Every run in (overfitting index, peak val/acc); the front joined and its runs named."""
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    points = result["points"]
    for name, p in points.items():
        ax.scatter(p["overfitting_index"], p["peak_val_acc"], s=60 if p["on_front"] else 25,
                   color="C3" if p["on_front"] else "C0", zorder=3)
        ax.annotate(name, (p["overfitting_index"], p["peak_val_acc"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    front = sorted((p["overfitting_index"], p["peak_val_acc"]) for n, p in points.items() if p["on_front"])
    if len(front) > 1:
        ax.plot(*np.asarray(front).T, color="C3", linewidth=1, zorder=2)
    ax.set_xlabel("overfitting index (mean val - train loss, last third; lower is better)")
    ax.set_ylabel("peak val/acc (higher is better)")
    ax.set_title("Pareto front (red)")
    return fig
