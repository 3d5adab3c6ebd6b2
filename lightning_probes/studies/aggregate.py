"""Reading a study's trials back from what Lightning wrote, and its tables: ``trials.csv``, ``summary.json``,
``summary.md``.

Metrics come from each trial's ``CSVLogger`` files, read with pandas: ``metrics.csv`` (plus the
``metrics.part<k>.csv`` of earlier, interrupted attempts, in order, a later attempt's value of an epoch winning)
for the epoch metrics (``train/*`` and ``val/*``, one value per epoch), ``test/metrics.csv`` for ``test/*``.
The statistics are those of ``lightning_probes.functional.statistics``.

Trials that ran a ``GradientStatsMonitor`` also left ``<probes dir>/<probe name>/gradient_flow.json`` (default
``trials/<trial_id>/probes/gradient_stats/gradient_flow.json``); ``summary.json`` then gets a ``gradient_flow``
section with those files averaged over each setting's seeds (``mean_gradient_flow``).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd

from lightning_probes.functional.statistics import (
    per_epoch_mean_std,
    seed_mean_std,
    student_t_interval,
    welch_t_test,
)

log = logging.getLogger(__name__)

__all__ = ["TrialResult", "build_summary", "collect_results", "find_gradient_flow", "gradient_flow_markdown",
           "gradient_flow_summary", "mean_gradient_flow", "read_epoch_metrics", "read_gradient_flow",
           "read_test_metrics", "summary_markdown", "trials_table"]

EPOCH_PREFIXES = ("train/", "val/")
TEST_PREFIX = "test/"
GRADIENT_FLOW_FILE = "gradient_flow.json"
GRADIENT_FLOW_WINDOWS = ("first", "last")
GRADIENT_FLOW_STATS = ("mean", "std")


def _read_csvs(paths: Sequence[str]) -> pd.DataFrame:
    frames = []
    for order, path in enumerate(paths):
        try:
            frame = pd.read_csv(path)
        except (OSError, pd.errors.EmptyDataError):
            continue
        frame = frame.copy()  # consolidate: a wide CSV (every probe scalar) reads into many blocks
        frame["_attempt"] = order
        frames.append(frame)
    return pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame()


def _metric_files(directory: str) -> list[str]:
    parts = sorted(glob.glob(os.path.join(directory, "metrics.part*.csv")),
                   key=lambda p: int(re.search(r"part(\d+)\.csv$", p).group(1)))
    current = os.path.join(directory, "metrics.csv")
    return parts + ([current] if os.path.isfile(current) else [])


def read_epoch_metrics(trial_dir: str) -> pd.DataFrame:
    """The trial's epoch metrics: one row per epoch (index ``epoch``), one column per ``train/*``/``val/*`` metric.

    Args:
        trial_dir: The trial directory (``CSVLogger`` wrote ``metrics.csv`` there).

    Returns:
        A DataFrame sorted by epoch; empty if nothing was logged. For each epoch and metric, the value of the
        latest attempt (a resumed run logs the epochs after its checkpoint again).
    """
    frame = _read_csvs(_metric_files(trial_dir))
    if frame.empty or "epoch" not in frame:
        return pd.DataFrame()
    columns = sorted(c for c in frame.columns if c.startswith(EPOCH_PREFIXES) and not c.endswith("_step"))
    frame = frame.dropna(subset=["epoch"])
    frame = frame[frame[columns].notna().any(axis=1)] if columns else frame.iloc[0:0]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame = frame.assign(epoch=frame["epoch"].astype(int)).sort_values(["epoch", "_attempt"], kind="stable")
    table = frame.groupby("epoch")[columns].last()  # last non-null: the latest attempt wins
    return table.sort_index()


def read_test_metrics(trial_dir: str) -> dict[str, float]:
    """The trial's ``test/*`` metrics (last logged value of each), from ``<trial_dir>/test/metrics.csv``."""
    frame = _read_csvs(_metric_files(os.path.join(trial_dir, "test")))
    out: dict[str, float] = {}
    for column in sorted(c for c in frame.columns if c.startswith(TEST_PREFIX)):
        values = frame[column].dropna()
        if len(values):
            out[column] = float(values.iloc[-1])
    return out


def final_values(epochs: pd.DataFrame) -> dict[str, float]:
    """The last logged value of every epoch metric."""
    out = {}
    for column in epochs.columns:
        values = epochs[column].dropna()
        if len(values):
            out[column] = float(values.iloc[-1])
    return out


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


@dataclass
class TrialResult:
    """One trial read back.

    Args:
        trial_id: Its name.
        params: Grid key -> value.
        seed: Its seed.
        status: ``finished``, ``failed`` or ``pending`` (never ended).
        epochs: Epoch metrics (``read_epoch_metrics``).
        test: ``test/*`` metrics.
        error: The failure's error line, if any.
        gradient_flow: Its ``GradientStatsMonitor``'s ``gradient_flow.json`` (``read_gradient_flow``), if any.
    """

    trial_id: str
    params: dict[str, Any]
    seed: int
    status: str
    epochs: pd.DataFrame = field(default_factory=pd.DataFrame)
    test: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None
    gradient_flow: Optional[dict[str, Any]] = None

    @property
    def final(self) -> dict[str, float]:
        """Final value of every epoch metric."""
        return final_values(self.epochs)


def collect_results(trials: Sequence[Any], trials_root: str, cwd: Optional[str] = None) -> list[TrialResult]:
    """Read every trial of the study back (status from ``status.json``, metrics from the CSV logs, the gradient
    flow from ``GradientStatsMonitor``'s ``gradient_flow.json`` where there is one).

    Args:
        trials: The study's ``Trial`` objects (``trial_id``, ``params``, ``seed``).
        trials_root: ``<output>/trials``.
        cwd: Working directory the trials ran in (for a probe's relative ``output_dir``; default: the current one).
    """
    from lightning_probes.studies.runner import read_status

    results = []
    for trial in trials:
        trial_dir = os.path.join(trials_root, trial.trial_id)
        status = read_status(trial_dir) or {}
        state = status.get("status", "pending")
        result = TrialResult(trial.trial_id, dict(trial.params), trial.seed, state, error=status.get("error"))
        if state == "finished":
            result.epochs = read_epoch_metrics(trial_dir)
            result.test = read_test_metrics(trial_dir)
            path = find_gradient_flow(trial_dir, cwd)
            result.gradient_flow = read_gradient_flow(path) if path else None
        results.append(result)
    return results


def trials_table(results: Sequence[TrialResult], grid_keys: Sequence[str]) -> pd.DataFrame:
    """``trials.csv``: one row per trial: id, seed, grid values, status, final epoch metrics, test metrics."""
    rows = []
    for r in results:
        row: dict[str, Any] = {"trial_id": r.trial_id, "seed": r.seed}
        row.update({k: _scalar(r.params.get(k)) for k in grid_keys})
        row["status"] = r.status
        row["epochs"] = len(r.epochs)
        row.update(r.final)
        row.update(r.test)
        row["error"] = r.error or ""
        rows.append(row)
    table = pd.DataFrame(rows)
    fixed = ["trial_id", "seed", *grid_keys, "status", "epochs"]
    metrics = sorted(c for c in table.columns if c not in fixed and c != "error")
    metrics = [c for c in metrics if not c.startswith(TEST_PREFIX)] + [c for c in metrics if c.startswith(TEST_PREFIX)]
    return table.reindex(columns=[*fixed, *metrics, "error"])


def _scalar(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)


def _stats(values: Sequence[float]) -> dict[str, Any]:
    mean, std = seed_mean_std(values)
    return {"mean": mean, "std": std, "ci95": list(student_t_interval(values)), "values": list(values)}


def _setting_key(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def gradient_flow_summary(results: Sequence[TrialResult]) -> Optional[dict[str, Any]]:
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
            entry = settings.setdefault(_setting_key(r.params), {"params": dict(r.params), "trials": []})
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


def comparison_metric(monitor: str, results: Sequence[TrialResult]) -> tuple[str, str]:
    """The metric the settings are compared on: the test counterpart of ``monitor`` (``val/acc`` -> ``test/acc``)
    when the trials were tested, else the monitor's final-epoch value.

    Returns:
        ``(metric, source)`` with ``source`` ``"test"`` or ``"final"``.
    """
    suffix = monitor.split("/", 1)[-1]
    test_metric = f"{TEST_PREFIX}{suffix}"
    if any(test_metric in r.test for r in results):
        return test_metric, "test"
    return monitor, "final"


def build_summary(results: Sequence[TrialResult], grid_keys: Sequence[str], monitor: str, mode: str = "max",
                  name: str = "") -> dict[str, Any]:
    """``summary.json``: per setting (grid point) the statistics over its finished seeds, the best setting and a
    Welch t-test of the best setting against each other one.

    Per setting: ``n`` finished seeds, ``epochs`` (per-epoch mean and sample std of every epoch metric),
    ``final`` and ``test`` (mean, sample std ``ddof=1``, Student-t 95% interval and the per-seed values of every
    final epoch metric and test metric), and ``welch`` (t statistic and p-value of the comparison metric, best
    against this setting). The best setting has the best mean over seeds of the monitor's final-epoch value.
    When finished trials left a ``GradientStatsMonitor`` gradient flow, a ``gradient_flow`` section
    (``gradient_flow_summary``) is added.

    Args:
        results: Every trial (only ``finished`` ones count).
        grid_keys: The grid's dotted keys.
        monitor: Epoch metric that picks the best setting.
        mode: ``"max"`` or ``"min"``.
        name: The study's name.

    Returns:
        A JSON-ready dict (``NaN`` where a statistic is undefined; written as ``null``).
    """
    settings: dict[str, dict[str, Any]] = {}
    for r in results:
        entry = settings.setdefault(_setting_key(r.params), {"params": dict(r.params), "trials": []})
        entry["trials"].append(r)
    compare, source = comparison_metric(monitor, results)
    out_settings = []
    for entry in settings.values():
        done = [r for r in entry["trials"] if r.status == "finished"]
        metrics = sorted({c for r in done for c in r.epochs.columns})
        epochs = {}
        for metric in metrics:
            curves = [r.epochs[metric].to_numpy(dtype=float) if metric in r.epochs else np.array([]) for r in done]
            mean, std = per_epoch_mean_std(curves)
            epochs[metric] = {"mean": mean, "std": std}
        finals = [r.final for r in done]
        final = {m: _stats([f[m] for f in finals if m in f]) for m in metrics}
        test_names = sorted({m for r in done for m in r.test})
        test = {m: _stats([r.test[m] for r in done if m in r.test]) for m in test_names}
        out_settings.append({
            "params": entry["params"],
            "n": len(done),
            "seeds": [r.seed for r in done],
            "failed_seeds": [r.seed for r in entry["trials"] if r.status == "failed"],
            "epochs": epochs,
            "final": final,
            "test": test,
        })
    scored = [(s["final"].get(monitor, {}).get("mean", math.nan), i) for i, s in enumerate(out_settings)]
    scored = [(v, i) for v, i in scored if not math.isnan(v)]
    best_index = None
    if scored:
        best_index = (max if mode == "max" else min)(scored, key=lambda vi: vi[0])[1]
    else:
        log.warning("no finished trial logged the monitor %r", monitor)
    for i, setting in enumerate(out_settings):
        setting["best"] = i == best_index
        if best_index is None:
            setting["welch"] = None
            continue
        table = "test" if source == "test" else "final"
        best_values = out_settings[best_index][table].get(compare, {}).get("values", [])
        values = setting[table].get(compare, {}).get("values", [])
        t, p = welch_t_test(best_values, values) if i != best_index else (math.nan, math.nan)
        setting["welch"] = {"metric": compare, "t": t, "p_value": p}
    summary: dict[str, Any] = {
        "name": name,
        "monitor": monitor,
        "mode": mode,
        "grid_keys": list(grid_keys),
        "compare": {"metric": compare, "source": source, "test": "welch_t_test (scipy.stats.ttest_ind, "
                                                                  "equal_var=False), best vs setting"},
        "best": out_settings[best_index]["params"] if best_index is not None else None,
        "n_trials": len(results),
        "n_finished": sum(r.status == "finished" for r in results),
        "n_failed": sum(r.status == "failed" for r in results),
        "settings": out_settings,
    }
    flow = gradient_flow_summary(results)
    if flow is not None:
        summary["gradient_flow"] = flow
    return summary


def _fmt(stats: Optional[Mapping[str, Any]], digits: int = 4) -> str:
    if not stats or stats.get("mean") is None or math.isnan(stats["mean"]):
        return "-"
    std = stats.get("std")
    if std is None or math.isnan(std):
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {std:.{digits}f}"


def setting_label(params: Mapping[str, Any]) -> str:
    """``lr=0.05, dropout=0.2``: a setting's grid values by the keys' last dotted component."""
    from lightning_probes.studies.spec import _short_keys, _value_label

    short = _short_keys(list(params))
    return ", ".join(f"{short[k]}={_value_label(v)}" for k, v in params.items()) or "(base)"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """``summary.md``: one row per setting: n, mean ± std of the final validation metrics and the test metrics, and
    the Welch p-value against the best setting (best first marked **best**)."""
    settings = summary["settings"]
    val = sorted({m for s in settings for m in s["final"] if m.startswith("val/")})
    test = sorted({m for s in settings for m in s["test"]})
    compare = summary["compare"]["metric"]
    header = ["setting", "n", *[f"{m} (final)" for m in val], *test, f"p vs best ({compare})"]
    lines = [f"# Study {summary.get('name') or ''}".rstrip(), "",
             f"Best setting by the mean over seeds of the final `{summary['monitor']}` ({summary['mode']}): "
             f"**{setting_label(summary['best']) if summary['best'] is not None else 'none'}**. "
             f"Values are mean ± sample std over seeds; p: Welch's t-test of the best setting against each other "
             f"on `{compare}`.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in settings:
        p = (s.get("welch") or {}).get("p_value")
        p_text = "best" if s.get("best") else ("-" if p is None or math.isnan(p) else f"{p:.3g}")
        n = f"{s['n']}" + (f" ({len(s['failed_seeds'])} failed)" if s["failed_seeds"] else "")
        row = [setting_label(s["params"]), n, *[_fmt(s["final"].get(m)) for m in val],
               *[_fmt(s["test"].get(m)) for m in test], p_text]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"{summary['n_finished']} of {summary['n_trials']} trials finished, {summary['n_failed']} failed.")
    if summary.get("gradient_flow"):
        lines += ["", *gradient_flow_markdown(summary["gradient_flow"])]
    return "\n".join(lines) + "\n"


def gradient_flow_markdown(flow: Mapping[str, Any]) -> list[str]:
    """The gradient-flow table of ``summary.md``: one row per weight tensor (biases left out, as in the figure;
    every tensor when no name ends in ``weight``), per setting the seeds' mean |grad| over the first and the last
    window, ``first → last``.
    """
    from lightning_probes.studies.figures import plotted_layers

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


def log_trial_hparams(trial_dir: str, params: Mapping[str, Any], seed: int) -> None:
    """Write the trial's grid values and seed with its final metrics as TensorBoard hparams (HPARAMS tab).

    The session is written into the trial's own run (``trial_dir``), next to Lightning's scalars, so TensorBoard
    shows each metric's last logged value in the table.
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    metrics = {**final_values(read_epoch_metrics(trial_dir)), **read_test_metrics(trial_dir)}
    if not metrics:
        return
    hparam_dict = {k: _scalar(v) for k, v in params.items()}
    hparam_dict["seed"] = seed
    exp, ssi, sei = hparams(hparam_dict, metrics)
    writer = SummaryWriter(log_dir=trial_dir, filename_suffix=".hparams")
    try:
        file_writer = writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
    finally:
        writer.close()
