"""The gradient probes' figures, each drawn from data the probes keep in their files, during training and by
``lightning-probes plot`` afterwards (`GradientStatsMonitor.figures_from_files`,
`GradientDynamicsMonitor.figures_from_files`).

- ``gradient_stats/gradient_flow.png``: from ``gradient_stats/gradient_flow.json``;
- ``gradient_dynamics/gradient_dynamics.png``: from the ``__total__`` records of ``gradient_dynamics.jsonl``;
- ``gradient_dynamics/gradient_sign_map.png`` and ``..._zoom.png``: from ``gradient_dynamics/sign_map.npz``
  (``rows``: one ``int8`` row of categories per epoch, ``epochs``, ``release_threshold``, ``zoom_columns``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_probes.naming import TOTAL
from lightning_probes.plotting import grouped_bars, line_panels, sign_map

#: ``(file name in <name>/, logger tag relative to the probe, draw())``, as `ProbeCallback.figures_from_files`.
Spec = tuple[str, str, Any]
#: What ``gradient_dynamics.png`` plots over the steps.
OVER_TRAINING_KEYS = ("zero_count", "released_fraction", "sign_flip_fraction", "update_norm")


def flow_figure(flow: Mapping[str, Any]) -> Any:
    """``gradient_flow.png`` from the contents of ``gradient_flow.json``."""
    panels = {f"{stat} |grad| per layer": {w: [np.nan if v is None else v for v in flow[w][stat]]
                                           for w in ("first", "last")} for stat in ("mean", "std")}
    return grouped_bars(flow["layers"], panels,
                        title=f"Gradient flow: first vs last {flow['window']} optimiser steps")


def flow_specs(directory: str, name: str) -> list[Spec]:
    """The gradient-flow figure of a run of `GradientStatsMonitor`, if its summary was written."""
    path = os.path.join(directory, name, "gradient_flow.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        flow = json.load(f)
    return [("gradient_flow.png", "gradient_flow", lambda: flow_figure(flow))]


def sign_categories(row: np.ndarray, release_threshold: float) -> np.ndarray:
    """A sign-map row: 0 where ``|g| > release_threshold``, 1 small negative, 2 small positive, 3 zero (or
    never sampled)."""
    return np.where(np.abs(row) > release_threshold, 0,
                    np.where(row < 0, 1, np.where(row > 0, 2, 3))).astype(np.int8)


def sign_map_specs(rows: np.ndarray, epochs: Sequence[int], release_threshold: float,
                   zoom_columns: Sequence[int]) -> list[Spec]:
    """The whole and the zoomed sign map of ``rows`` (one per epoch)."""
    title = f"Gradient-sign map, threshold {release_threshold:g}"
    epochs = list(epochs)
    specs: list[Spec] = [("gradient_sign_map.png", "sign_map", lambda: sign_map(rows, epochs, title))]
    start, stop = int(zoom_columns[0]), min(int(zoom_columns[1]), rows.shape[1])
    if start < stop:
        specs.append(("gradient_sign_map_zoom.png", "sign_map_zoom",
                      lambda: sign_map(rows, epochs, title + f" (columns {start}-{stop})", (start, stop))))
    return specs


def over_training_figure(totals: Sequence[Mapping[str, Any]]) -> Any:
    """``gradient_dynamics.png`` from the ``__total__`` records."""
    series = {key: [np.nan if r.get(key) is None else r[key] for r in totals] for key in OVER_TRAINING_KEYS}
    return line_panels([r["step"] for r in totals], series, "optimiser step", "Gradient dynamics (all layers)")


def dynamics_specs(directory: str, name: str, records: Sequence[Mapping[str, Any]]) -> list[Spec]:
    """Every figure of a run of `GradientDynamicsMonitor` that its files hold the data for."""
    specs: list[Spec] = []
    path = os.path.join(directory, name, "sign_map.npz")
    if os.path.exists(path):
        with np.load(path) as data:
            rows, epochs = data["rows"], data["epochs"].tolist()
            threshold, zoom = float(data["release_threshold"]), data["zoom_columns"].tolist()
        if len(rows):
            specs += sign_map_specs(rows, epochs, threshold, zoom)
    totals = [r for r in records if r.get("layer") == TOTAL]
    if totals:
        specs.append(("gradient_dynamics.png", "over_training", lambda: over_training_figure(totals)))
    return specs
