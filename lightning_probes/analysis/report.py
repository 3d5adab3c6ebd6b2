"""The analyzer's figures, its one-image dashboard and its self-contained ``report.html``.

The report embeds every figure as a base64 PNG and every table as HTML, with an inline style sheet and no
reference to anything outside the file: it opens in a browser without network access. A small inline script
counts the figures that decoded (``data-images-loaded`` on ``<body>``), which the tests read in a headless browser.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import os
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lightning_probes.io import atomic_write_bytes, render_png

__all__ = ["FIGURES", "dashboard_figure", "format_headline", "write_figures", "write_report"]

#: ``{analysis: file name}`` of the figures, in report order.
FIGURES = {
    "weights": "weights.png",
    "weight_evolution": "weight_evolution.png",
    "calibration": "calibration.png",
    "confidence": "confidence.png",
    "information_flow": "information_flow.png",
    "training_dynamics": "training_dynamics.png",
    "similarity": "similarity.png",
    "pareto": "pareto.png",
    "dashboard": "summary_dashboard.png",
}

_HEADLINE_COLUMNS = ("run", "peak_val_acc", "peak_epoch", "test_acc", "overfitting_index", "ece", "brier",
                     "mean_health", "min_health", "pareto")


def _save(fig: Figure, path: str) -> str:
    atomic_write_bytes(path, render_png(fig, dpi=100))
    return path


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_headline(rows: list[Mapping[str, Any]]) -> str:
    """The headline numbers as a plain-text table (the console summary)."""
    cells = [list(_HEADLINE_COLUMNS)] + [[_number(r.get(c)) for c in _HEADLINE_COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_HEADLINE_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def dashboard_figure(results: Mapping[str, Any]) -> Figure:
    """Four panels: the performance table, the similarity map, the confidence profiles and the calibration
    landscape (ECE against Brier score per model)."""
    from lightning_probes.analysis.similarity import draw_map

    fig = Figure(figsize=(15, 10), layout="constrained")
    (table_ax, map_ax), (profile_ax, landscape_ax) = fig.subplots(2, 2)
    rows = results["headline"]
    columns = ("run", "peak_val_acc", "test_acc", "overfitting_index", "ece", "mean_health", "pareto")
    table_ax.set_axis_off()
    table = table_ax.table(cellText=[[_number(r.get(c), 3) for c in columns] for r in rows[:25]],
                           colLabels=[c.replace("_", " ") for c in columns], loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1, 1.3)
    table_ax.set_title("Performance" + (f" (first 25 of {len(rows)} runs)" if len(rows) > 25 else ""), fontsize=11)
    draw_map(map_ax, results["similarity"]["pca"])
    calibration = results["calibration"]["per_model"]
    for i, (name, result) in enumerate(calibration.items()):
        hist = result["confidence_histogram"]
        edges = np.asarray(hist["edges"])
        counts = np.asarray(hist["correct"], dtype=float) + np.asarray(hist["wrong"], dtype=float)
        if counts.size == edges.size - 1 and counts.sum() > 0:
            profile_ax.plot((edges[:-1] + edges[1:]) / 2, counts / counts.sum(), color=f"C{i % 10}", label=name)
    profile_ax.set_title("Confidence profiles (share of predictions per top-label confidence)", fontsize=10)
    profile_ax.set_xlabel("top-label confidence")
    if calibration:
        profile_ax.legend(fontsize=7)
    for i, (name, result) in enumerate(calibration.items()):
        if result.get("ece") is not None and result.get("brier") is not None:
            landscape_ax.scatter(result["brier"], result["ece"], color=f"C{i % 10}", s=40)
            landscape_ax.annotate(name, (result["brier"], result["ece"]), fontsize=7, xytext=(4, 4),
                                  textcoords="offset points")
    landscape_ax.set_xlabel("Brier score (lower is better)")
    landscape_ax.set_ylabel("ECE (lower is better)")
    landscape_ax.set_title("Calibration landscape", fontsize=10)
    if not calibration:
        for ax in (profile_ax, landscape_ax):
            ax.text(0.5, 0.5, "no calibration data (no --config, no ConfidenceMonitor)", ha="center", va="center",
                    transform=ax.transAxes)
    fig.suptitle(f"lightning-probes analyze: {len(rows)} runs")
    return fig


def write_figures(results: Mapping[str, Any], output: str) -> dict[str, str]:
    """Draw and write every figure that has data; returns ``{analysis: path}``."""
    from lightning_probes.analysis.calibration import calibration_figure, confidence_figure
    from lightning_probes.analysis.dynamics import dynamics_figure
    from lightning_probes.analysis.information_flow import flow_figure
    from lightning_probes.analysis.pareto import pareto_figure
    from lightning_probes.analysis.similarity import similarity_figure
    from lightning_probes.analysis.weights import evolution_figure, weights_figure

    figures = {}

    def save(key: str, fig: Figure) -> None:
        figures[key] = _save(fig, os.path.join(output, FIGURES[key]))

    if results["weights"]["per_model"]:
        save("weights", weights_figure(results["weights"]["per_model"]))
    if results["weights"]["evolution"]:
        save("weight_evolution", evolution_figure(results["weights"]["evolution"]))
    if results["calibration"]["per_model"]:
        save("calibration", calibration_figure(results["calibration"]["per_model"]))
        save("confidence", confidence_figure(results["calibration"]["per_model"]))
    if results["information_flow"]["per_model"]:
        save("information_flow", flow_figure(results["information_flow"]["per_model"]))
    if results["training_dynamics"]["per_model"]:
        save("training_dynamics", dynamics_figure(results["training_dynamics"]["per_model"]))
    similarity = results["similarity"]
    if similarity["pca"] is not None or similarity["cka"] is not None:
        save("similarity", similarity_figure(similarity["pca"], similarity["cka"]))
    if results["pareto"] is not None:
        save("pareto", pareto_figure(results["pareto"]))
    save("dashboard", dashboard_figure(results))
    return figures


# -- HTML ----------------------------------------------------------------------------------------------------------
_STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .85em; margin: .8em 0; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
.note { color: #666; font-size: .9em; } code { background: #f4f4f4; padding: 0 .2em; }
details { margin: .5em 0; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-images-loaded", String(loaded.length));
});
"""


def _table(frame: pd.DataFrame) -> str:
    frame = frame.map(lambda v: np.nan if v is None else v)  # `na_rep` for missing values of any column type
    return frame.to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}", border=0, escape=True)


def _image(path: str, alt: str) -> str:
    with open(path, "rb") as handle:
        data = base64.b64encode(handle.read()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _skips(results: Mapping[str, Any], *keys: str) -> str:
    notes = []
    for key in keys:
        for run, reason in results["skipped"]["per_run"].get(key, {}).items():
            notes.append(f"<li><b>{html.escape(run)}</b> ({html.escape(key)}): {html.escape(reason)}</li>")
        if key in results["skipped"]["analyses"]:
            notes.append(f"<li>{html.escape(key)}: {html.escape(results['skipped']['analyses'][key])}</li>")
    return f'<ul class="note">{"".join(notes)}</ul>' if notes else ""


def _section(title: str, body: list[str]) -> str:
    return f"<h2>{html.escape(title)}</h2>\n" + "\n".join(b for b in body if b)


def _weights_tables(results: Mapping[str, Any]) -> str:
    rows = []
    for name, result in results["weights"]["per_model"].items():
        for layer, stats in result["layers"].items():
            rows.append({"run": name, "layer": layer, "shape": "x".join(map(str, stats["shape"])),
                         **{k: stats[k] for k in ("l1", "l2", "spectral_norm", "stable_rank", "mean", "std",
                                                  "skewness", "kurtosis", "sparsity", "health")}})
    return _table(pd.DataFrame(rows)) if rows else ""


def _calibration_table(results: Mapping[str, Any]) -> str:
    keys = ("n", "accuracy", "ece", "adaptive_ece", "classwise_ece", "brier", "nll", "mean_confidence",
            "mean_entropy")
    rows = [{"run": name, **{k: r.get(k) for k in keys}, "source": r.get("source")}
            for name, r in results["calibration"]["per_model"].items()]
    return _table(pd.DataFrame(rows)) if rows else ""


def _flow_table(results: Mapping[str, Any]) -> str:
    keys = ("units", "mean", "std", "sparsity", "dead_units", "dead_fraction", "positive_ratio", "effective_rank")
    rows = [{"run": name, "layer": layer, **{k: stats.get(k) for k in keys}}
            for name, r in results["information_flow"]["per_model"].items() for layer, stats in r["layers"].items()]
    return _table(pd.DataFrame(rows)) if rows else ""


def _dynamics_table(results: Mapping[str, Any]) -> str:
    keys = ("epochs", "epochs_to_convergence", "overfitting_index", "stability", "stability_epochs", "peak_val_acc",
            "peak_epoch", "final_gap")
    rows = [{"run": name, **{k: r.get(k) for k in keys}}
            for name, r in results["training_dynamics"]["per_model"].items()]
    return _table(pd.DataFrame(rows)) if rows else ""


def _cka_table(cka: Optional[Mapping[str, Any]]) -> str:
    if cka is None:
        return ""
    frame = pd.DataFrame(cka["matrix"], columns=cka["models"])
    frame.insert(0, "run", cka["models"])
    return _table(frame)


def write_report(results: Mapping[str, Any], figures: Mapping[str, str], output: str) -> str:
    """Write ``report.html`` (figures embedded, tables as HTML); returns its path."""
    def figure(key: str) -> str:
        return _image(figures[key], key) if key in figures else ""

    headline = pd.DataFrame(results["headline"], columns=list(_HEADLINE_COLUMNS))
    headline["pareto"] = headline["pareto"].map(lambda v: "yes" if v else "")
    skipped_runs = "".join(f"<li>{html.escape(s['run'])}: {html.escape(s['reason'])}</li>"
                           for s in results["skipped"]["runs"])
    data = results["data"]
    sections = [
        _section("Summary", [figure("dashboard"), _table(headline),
                             f'<p class="note">Data: {html.escape(data["note"])}.</p>',
                             f'<ul class="note">{skipped_runs}</ul>' if skipped_runs else ""]),
        _section("Weights", [
            f'<p class="note">Health score: {html.escape(results["weights"]["health_formula"])}.</p>',
            figure("weights"), figure("weight_evolution"),
            f"<details><summary>every layer</summary>{_weights_tables(results)}</details>",
            _skips(results, "weights", "weight_evolution")]),
        _section("Calibration", [figure("calibration"), figure("confidence"), _calibration_table(results),
                                 _skips(results, "calibration", "per_class_ece")]),
        _section("Information flow", [figure("information_flow"), _flow_table(results),
                                      _skips(results, "information_flow")]),
        _section("Training dynamics", [
            '<p class="note">Epochs to convergence: first epoch with val/acc &ge; 0.95 &times; its maximum. '
            "Overfitting index: mean(val/loss &minus; train/loss) over the last third of the epochs (from epoch "
            "max(int(0.67 n), 1)). Stability: std of the last 10 val/loss values (fewer when shorter). Final gap: "
            "last val/loss &minus; last train/loss.</p>",
            figure("training_dynamics"), _dynamics_table(results), _skips(results, "training_dynamics")]),
        _section("Similarity", [figure("similarity"), _cka_table(results["similarity"]["cka"]),
                                _skips(results, "similarity_pca", "similarity_cka", "cka")]),
        _section("Pareto front", [
            '<p class="note">Peak val/acc (higher is better) against overfitting index (lower is better).</p>',
            figure("pareto"), _skips(results, "pareto")]),
    ]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lightning-probes analysis</title>
<style>{_STYLE}</style></head>
<body>
<h1>lightning-probes analysis: {len(results["runs"])} runs</h1>
<p class="note">Written {stamp}. Every number is also in <code>analysis_results.json</code>.</p>
{"".join(sections)}
<script>{_SCRIPT}</script>
</body></html>
"""
    path = os.path.join(output, "report.html")
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
