"""The engine of ``lightning-probes analyze``: every analysis of every run, the comparison, and the files.

`prepare` checks every argument, finds the runs, reads every last checkpoint safely and loads the samples (all
before any analysis starts, so bad input fails in seconds); `analyze_runs` runs the analyses per run (a progress
bar over runs), then the comparisons (similarity, Pareto front), and `write_outputs` writes
``analysis_results.json``, one PNG per analysis, ``summary_dashboard.png`` and ``report.html``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from lightning_probes.analysis.runs import RunInfo, discover_runs, read_curves
from lightning_probes.checks import check_positive_int
from lightning_probes.functional import HEALTH_FORMULA
from lightning_probes.io import read_checkpoint

log = logging.getLogger(__name__)

__all__ = ["ANALYSES", "PreparedAnalysis", "analyze_runs", "headline_table", "prepare", "write_outputs"]

#: The analyses, in report order.
ANALYSES = ("weights", "calibration", "information_flow", "training_dynamics", "similarity", "pareto")


@dataclass
class PreparedAnalysis:
    """Everything `prepare` checked and built."""

    runs: list[RunInfo]
    skipped_runs: list[dict[str, str]]
    output: str
    config: Optional[str]
    samples: Any
    num_samples: int
    seed: int
    trust: bool
    progress: bool
    batch_size: int = 256
    data_note: str = ""


def prepare(runs: list[str], output: Optional[str] = None, config: Optional[str] = None, num_samples: int = 1000,
            names: Optional[list[str]] = None, seed: int = 0, trust_checkpoints: bool = False,
            progress: bool = True, batch_size: int = 256) -> PreparedAnalysis:
    """Check the arguments, find the runs, read their last checkpoints and load the samples; nothing is written.

    Raises:
        ValueError, FileNotFoundError: Naming the argument (``RUN``, ``num_samples``, ``names``, ``config``, a
            checkpoint that needs ``--trust_checkpoints``), before any analysis starts.
    """
    from lightning_probes.analysis.forward import load_samples
    from lightning_probes.build import build_from_config

    if not runs:
        raise ValueError("Expected at least one RUN (a run directory or a study output), but got none")
    check_positive_int("num_samples", num_samples)
    check_positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Expected `seed` to be an integer, but got {seed!r}")
    if config is not None and not os.path.isfile(config):
        raise FileNotFoundError(f"Expected `config` to be a fit config file, but {config!r} is not a file (looked for "
                                f"{os.path.abspath(config)!r})")
    found, skipped = discover_runs(list(runs), names)
    for run in found:  # refuse unsafe checkpoints now, not halfway through
        for path in run.checkpoints:
            read_checkpoint(path, "RUN checkpoint", trust=trust_checkpoints)
    samples, note = None, "no --config: the data-dependent analyses use what the probes recorded"
    if config is not None:
        samples = load_samples(build_from_config(config)[1], num_samples, seed)
        note = f"{len(samples.labels)} test samples of {config} (seed {seed})"
    output = output or os.path.join(os.getcwd(), "analysis")
    return PreparedAnalysis(runs=found, skipped_runs=skipped, output=output, config=config, samples=samples,
                            num_samples=num_samples, seed=seed, trust=trust_checkpoints, progress=progress,
                            batch_size=batch_size, data_note=note)


def _finite(value: Any) -> Any:
    """JSON-safe numbers: NaN and infinities become ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _analyse_run(run: RunInfo, p: PreparedAnalysis, results: dict[str, Any], skipped: dict[str, dict[str, str]],
                 penultimate: dict[str, Any]) -> None:
    from lightning_probes.analysis.calibration import calibration_from_logits, calibration_from_probes
    from lightning_probes.analysis.dynamics import run_dynamics
    from lightning_probes.analysis.forward import run_model
    from lightning_probes.analysis.information_flow import flow_from_probes
    from lightning_probes.analysis.weights import run_evolution, run_weights
    from lightning_probes.io import module_from_checkpoint

    name = run.name
    epochs, test, source = read_curves(run)
    results["runs"][name].update({"metrics_source": source, "test": test})
    dynamics, note = run_dynamics(epochs)
    if dynamics is None:
        skipped["training_dynamics"][name] = note
    else:
        results["training_dynamics"]["per_model"][name] = dynamics
    if run.last_checkpoint is None:
        for analysis in ("weights",):
            skipped[analysis][name] = "no checkpoint in checkpoints/"
    else:
        results["weights"]["per_model"][name] = run_weights(run.last_checkpoint, p.trust)
        evolution = run_evolution(run.checkpoints, p.trust)
        if len(evolution) > 1:
            results["weights"]["evolution"][name] = evolution
        else:
            skipped["weight_evolution"][name] = "only one distinct checkpoint"
    model_pass, why = None, "no --config"
    if p.samples is not None:
        if run.last_checkpoint is None:
            why = "no checkpoint to rebuild the model from"
        else:
            try:
                model = module_from_checkpoint(run.last_checkpoint, "RUN checkpoint", trust=p.trust)
                model_pass = run_model(model, p.samples, p.batch_size)
            except Exception as err:  # one model that does not fit the data must not stop the others
                why = f"could not run the model on the data: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
                log.warning("analyze: %s: %s", name, why)
    if model_pass is not None:
        calibration = calibration_from_logits(model_pass.logits, p.samples.labels)
        calibration["source"] = "data"
        results["calibration"]["per_model"][name] = calibration
        results["information_flow"]["per_model"][name] = {"layers": model_pass.layers, "source": "data"}
        penultimate[name] = model_pass.penultimate
        return
    calibration, note = calibration_from_probes(run.probes)
    if calibration is None:
        skipped["calibration"][name] = f"{why}; {note}"
    else:
        results["calibration"]["per_model"][name] = calibration
        skipped["per_class_ece"][name] = f"{why}: the probes record no per-sample predictions"
    flow, note = flow_from_probes(run.probes)
    if flow is None:
        skipped["information_flow"][name] = f"{why}; {note}"
    else:
        results["information_flow"]["per_model"][name] = flow
    skipped["cka"][name] = why


def analyze_runs(p: PreparedAnalysis) -> dict[str, Any]:
    """Every analysis of every run, then the comparisons. Returns what ``analysis_results.json`` holds."""
    from tqdm.auto import tqdm

    from lightning_probes.analysis.pareto import run_pareto
    from lightning_probes.analysis.similarity import cka_section, pca_section

    results: dict[str, Any] = {
        "runs": {r.name: {"path": r.path, "study": r.study, "checkpoint": r.last_checkpoint,
                          "checkpoints": len(r.checkpoints), "probes": r.probes} for r in p.runs},
        "data": {"config": p.config, "num_samples": None if p.samples is None else len(p.samples.labels),
                 "seed": p.seed, "note": p.data_note},
        "weights": {"health_formula": HEALTH_FORMULA, "per_model": {}, "evolution": {}},
        "calibration": {"per_model": {}},
        "information_flow": {"per_model": {}},
        "training_dynamics": {"per_model": {}},
    }
    skipped: dict[str, dict[str, str]] = {k: {} for k in ("weights", "weight_evolution", "calibration",
                                                           "per_class_ece", "information_flow", "training_dynamics",
                                                           "cka")}
    penultimate: dict[str, Any] = {}
    for run in tqdm(p.runs, desc="analyze", unit="run", disable=not p.progress):
        _analyse_run(run, p, results, skipped, penultimate)
    pca, why_pca = pca_section(results["weights"]["per_model"])
    cka, why_cka = cka_section(penultimate)
    results["similarity"] = {"pca": pca, "cka": cka}
    dynamics = results["training_dynamics"]["per_model"]
    results["pareto"] = run_pareto(dynamics) if dynamics else None
    overall = {}
    if pca is None:
        overall["similarity_pca"] = why_pca
    if cka is None:
        overall["similarity_cka"] = why_cka
    if not dynamics:
        overall["pareto"] = "no run has train/loss, val/loss and val/acc epoch curves"
    results["skipped"] = {"runs": p.skipped_runs, "analyses": overall,
                          "per_run": {k: v for k, v in skipped.items() if v}}
    results["headline"] = headline_table(results)
    return results


def headline_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per run: peak val/acc (and its epoch), test/acc, overfitting index, ECE, Brier, mean and minimum
    layer health, whether it is on the Pareto front."""
    rows = []
    front = set((results.get("pareto") or {}).get("front", []))
    for name, run in results["runs"].items():
        dyn = results["training_dynamics"]["per_model"].get(name, {})
        cal = results["calibration"]["per_model"].get(name, {})
        weights = results["weights"]["per_model"].get(name, {}).get("summary", {})
        rows.append({
            "run": name,
            "peak_val_acc": dyn.get("peak_val_acc"),
            "peak_epoch": dyn.get("peak_epoch"),
            "test_acc": run.get("test", {}).get("test/acc"),
            "overfitting_index": dyn.get("overfitting_index"),
            "ece": cal.get("ece"),
            "brier": cal.get("brier"),
            "mean_health": weights.get("mean_health"),
            "min_health": weights.get("min_health"),
            "pareto": name in front,
        })
    return rows


def write_outputs(results: dict[str, Any], output: str) -> list[str]:
    """Write ``analysis_results.json``, one PNG per analysis, ``summary_dashboard.png`` and ``report.html``.

    Returns:
        The files written (figures first).
    """
    from lightning_probes.analysis.report import write_figures, write_report
    from lightning_probes.io import atomic_write_json

    os.makedirs(output, exist_ok=True)
    figures = write_figures(results, output)
    results["figures"] = {key: os.path.basename(path) for key, path in figures.items()}
    json_path = os.path.join(output, "analysis_results.json")
    atomic_write_json(json_path, _finite(results))
    report = write_report(results, figures, output)
    return [*figures.values(), json_path, report]
