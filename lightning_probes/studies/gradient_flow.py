"""A study's gradient flow: each trial's ``GradientStatsMonitor`` ``gradient_flow.json``, averaged over seeds.

Trials that ran a ``GradientStatsMonitor`` left ``<probes dir>/<probe name>/gradient_flow.json`` (default
``trials/<trial_id>/probes/gradient_stats/gradient_flow.json``); ``summary.json`` then gets a ``gradient_flow``
section with those files averaged over each setting's seeds (``mean_gradient_flow``), ``summary.md`` a table of
it and the figures ``gradient_flow.png`` (``lightning_probes.studies.figures``).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from lightning_probes.studies.trials import setting_key, setting_label

log = logging.getLogger(__name__)

__all__ = ["GRADIENT_FLOW_FILE", "GRADIENT_FLOW_STATS", "GRADIENT_FLOW_WINDOWS", "find_gradient_flow",
           "gradient_flow_markdown", "gradient_flow_summary", "mean_gradient_flow", "plotted_layers",
           "read_gradient_flow"]

GRADIENT_FLOW_FILE = "gradient_flow.json"
GRADIENT_FLOW_WINDOWS = ("first", "last")
GRADIENT_FLOW_STATS = ("mean", "std")


def find_gradient_flow(trial_dir: str, cwd: Optional[str] = None) -> Optional[str]:
    """The ``gradient_flow.json`` a trial's ``GradientStatsMonitor`` wrote, or ``None`` if there is none.

    The trial's ``config.yaml`` gives each ``GradientStatsMonitor``'s ``output_dir`` (default
    ``<trial_dir>/probes``, as ``trainer.log_dir`` is the trial directory; a relative one is relative to ``cwd``,
    the trials' working directory) and ``name`` (default ``gradient_stats``); the first of them whose file exists
    wins. Failing that (no such entry, no readable config), the first ``<trial_dir>/probes/*/gradient_flow.json``
    by name.

    Args:
        trial_dir: The trial directory.
        cwd: Working directory the trial ran in (default: the current one).
    """
    import yaml

    candidates = []
    try:
        with open(os.path.join(trial_dir, "config.yaml"), encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        config = None
    trainer = config.get("trainer") if isinstance(config, Mapping) else None
    callbacks = trainer.get("callbacks") if isinstance(trainer, Mapping) else None
    callbacks = [callbacks] if isinstance(callbacks, Mapping) else callbacks or []
    for entry in callbacks:
        if not isinstance(entry, Mapping) or str(entry.get("class_path", "")).rsplit(".", 1)[-1] \
                != "GradientStatsMonitor":
            continue
        init_args = entry.get("init_args") or {}
        directory = init_args.get("output_dir") or os.path.join(trial_dir, "probes")
        directory = os.path.join(cwd or os.getcwd(), os.fspath(directory))  # an absolute one stays
        candidates.append(os.path.join(directory, init_args.get("name") or "gradient_stats", GRADIENT_FLOW_FILE))
    candidates += sorted(glob.glob(os.path.join(glob.escape(trial_dir), "probes", "*", GRADIENT_FLOW_FILE)))
    return next((path for path in candidates if os.path.isfile(path)), None)


def read_gradient_flow(path: str) -> Optional[dict[str, Any]]:
    """A ``gradient_flow.json`` checked for its shape, or ``None`` (with a warning) if it is unreadable.

    Returns:
        ``{"window": int, "layers": [...], "first": {"mean": [...], "std": [...]}, "last": {...}}``, one value
        per layer (``None`` for a layer without gradients in that window), as ``GradientStatsMonitor`` wrote it.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            flow = json.load(handle)
        layers = flow["layers"]
        if not isinstance(layers, list) or not all(isinstance(name, str) for name in layers):
            raise ValueError("`layers` is not a list of names")
        for window in GRADIENT_FLOW_WINDOWS:
            for stat in GRADIENT_FLOW_STATS:
                values = flow[window][stat]
                if not isinstance(values, list) or len(values) != len(layers):
                    raise ValueError(f"`{window}.{stat}` does not hold one value per layer")
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring the unreadable gradient flow %s: %s", path, err)
        return None
    return flow


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def mean_gradient_flow(flows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Average ``gradient_flow.json`` contents (one per seed) layer by layer.

    For each layer, window (``first``/``last``) and statistic (``mean``/``std`` of ``|grad|``), the mean over the
    seeds that have a value (a missing layer or a ``None`` value is left out; ``NaN`` when no seed has one). So
    ``std`` is the seeds' average of the within-window standard deviation of ``|grad|``, not a spread over seeds.

    Args:
        flows: Contents of ``gradient_flow.json`` files (``read_gradient_flow``), at least one.

    Returns:
        ``{"window", "layers", "first": {"mean", "std"}, "last": {"mean", "std"}}``: the layers in the order of
        the first file, then any layer only later files have; ``window`` is the first file's.

    Example:
        >>> a = {"window": 5, "layers": ["w"], "first": {"mean": [1.0], "std": [0.5]},
        ...      "last": {"mean": [2.0], "std": [None]}}
        >>> b = {"window": 5, "layers": ["w"], "first": {"mean": [3.0], "std": [1.5]},
        ...      "last": {"mean": [4.0], "std": [1.0]}}
        >>> mean_gradient_flow([a, b])["first"], mean_gradient_flow([a, b])["last"]
        ({'mean': [2.0], 'std': [1.0]}, {'mean': [3.0], 'std': [1.0]})
    """
    if not flows:
        raise ValueError("Expected at least one gradient flow to average, but got none")
    layers: list[str] = []
    for flow in flows:
        layers += [name for name in flow["layers"] if name not in layers]
    out: dict[str, Any] = {"window": flows[0].get("window"), "layers": layers}
    for window in GRADIENT_FLOW_WINDOWS:
        out[window] = {}
        for stat in GRADIENT_FLOW_STATS:
            table = np.full((len(flows), len(layers)), np.nan)  # (seeds, layers)
            for row, flow in enumerate(flows):
                for name, value in zip(flow["layers"], flow[window][stat]):
                    table[row, layers.index(name)] = _as_float(value)
            seen = np.isfinite(table)
            sums = np.where(seen, table, 0.0).sum(axis=0)
            counts = seen.sum(axis=0)
            means = np.divide(sums, counts, out=np.full(len(layers), np.nan), where=counts > 0)
            out[window][stat] = [float(v) for v in means]
    return out


def gradient_flow_summary(results: Sequence[Any]) -> Optional[dict[str, Any]]:
    """The ``gradient_flow`` section of ``summary.json``: per setting, its finished seeds' gradient flows averaged.

    Args:
        results: Every trial (only ``finished`` ones with a ``gradient_flow`` count).

    Returns:
        ``None`` if no finished trial has a gradient flow; else ``{"source": ..., "settings": [...]}`` with, per
        setting that has one (in the order of the trials), ``params``, ``n`` (seeds averaged), ``seeds`` and
        ``mean_gradient_flow``'s ``window``, ``layers``, ``first`` and ``last`` (``mean``/``std`` per layer).
    """
    settings: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.status == "finished" and r.gradient_flow is not None:
            entry = settings.setdefault(setting_key(r.params), {"params": dict(r.params), "trials": []})
            entry["trials"].append(r)
    if not settings:
        return None
    out = []
    for entry in settings.values():
        trials = entry["trials"]
        out.append({"params": entry["params"], "n": len(trials), "seeds": [r.seed for r in trials],
                    **mean_gradient_flow([r.gradient_flow for r in trials])})
    return {"source": f"GradientStatsMonitor {GRADIENT_FLOW_FILE}: per parameter tensor, mean and std of |grad| "
                      f"pooled over the first and the last `window` optimiser steps; each averaged over the "
                      f"setting's seeds",
            "settings": out}


def gradient_flow_markdown(flow: Mapping[str, Any]) -> list[str]:
    """The gradient-flow table of ``summary.md``: one row per weight tensor (biases left out, as in the figure;
    every tensor when no name ends in ``weight``), per setting the seeds' mean |grad| over the first and the last
    window, ``first → last``.
    """
    settings = flow["settings"]
    layers: list[str] = []
    for s in settings:
        layers += [s["layers"][i] for i in plotted_layers(s["layers"]) if s["layers"][i] not in layers]
    header = ["weight tensor", *[setting_label(s["params"]) for s in settings]]
    window = settings[0]["window"]
    lines = [f"## Gradient flow: mean |grad| over the first → last {window} optimiser steps (mean over seeds)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(setting: Mapping[str, Any], name: str) -> str:
        if name not in setting["layers"]:
            return "-"
        i = setting["layers"].index(name)
        first, last = setting["first"]["mean"][i], setting["last"]["mean"][i]
        return "-" if first is None or last is None else f"{first:.2e} → {last:.2e}"

    for name in layers:
        lines.append("| " + " | ".join([name, *[cell(s, name) for s in settings]]) + " |")
    return lines


def plotted_layers(layers: Sequence[str]) -> list[int]:
    """Indices of the weight tensors (names ending in ``weight``), or of every layer if there is none."""
    weights = [i for i, name in enumerate(layers) if name.rsplit(".", 1)[-1].endswith("weight")]
    return weights or list(range(len(layers)))
