"""A study's tables from its trials read back (``lightning_probes.studies.results``): ``trials.csv``,
``summary.json`` and ``summary.md``.

The statistics are those of ``lightning_probes.functional.statistics``. When finished trials left a
``GradientStatsMonitor`` gradient flow, ``summary.json`` and ``summary.md`` get its section
(``lightning_probes.studies.gradient_flow``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import pandas as pd

from lightning_probes.functional.statistics import (
    per_epoch_mean_std,
    seed_mean_std,
    student_t_interval,
    welch_t_test,
)
from lightning_probes.reading import TEST_PREFIX
from lightning_probes.studies.gradient_flow import gradient_flow_markdown, gradient_flow_summary
from lightning_probes.studies.importance import importance_markdown
from lightning_probes.studies.results import TrialResult
from lightning_probes.studies.trials import scalar_value, setting_key, setting_label

log = logging.getLogger(__name__)

__all__ = ["build_summary", "comparison_metric", "summary_markdown", "trials_table"]


def trials_table(results: Sequence[TrialResult], grid_keys: Sequence[str]) -> pd.DataFrame:
    """``trials.csv``: one row per trial: id, seed, grid values, status, final epoch metrics, test metrics."""
    rows = []
    for r in results:
        row: dict[str, Any] = {"trial_id": r.trial_id, "seed": r.seed}
        row.update({k: scalar_value(r.params.get(k)) for k in grid_keys})
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


def _stats(values: Sequence[float]) -> dict[str, Any]:
    mean, std = seed_mean_std(values)
    return {"mean": mean, "std": std, "ci95": list(student_t_interval(values)), "values": list(values)}


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
        entry = settings.setdefault(setting_key(r.params), {"params": dict(r.params), "trials": []})
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
    if summary.get("importance"):
        lines += ["", *importance_markdown(summary["importance"])]
    return "\n".join(lines) + "\n"


