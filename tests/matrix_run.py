"""Run cases of the model matrix (`tests/matrix_cases.py`) with every probe at its defaults (the two curvature
probes with fewer Hessian-vector products: `FEWER_PRODUCTS`).

Usage: ``python -m tests.matrix_run CASE[,CASE...] OUTPUT_DIR [--accelerator cpu|gpu] [--precision P]``
(several cases share one interpreter, so torch and Lightning are imported once). Writes
``OUTPUT_DIR/result.json`` for one case, ``OUTPUT_DIR/<CASE>/result.json`` for each of several:
``{"case", "probes": {probe: status}, "details": {probe: text}, "global_step"}``.

A probe's status is ``ok`` (it wrote records, every number finite), ``skipped`` (one skip warning and one
skip record per fit of the case, nothing else), ``refused`` (the run stopped before any step with one error
naming the probe; the case is then run again without it), ``idle`` (no record and no warning: the entry point
gives it nothing to do), or ``disabled``/``nonfinite``/``warnings``/``crash``/``not reached`` (what must never
happen). The probes run with ``on_error`` from ``$LIGHTNING_PROBES_ON_ERROR`` (the suite sets ``raise``), so any
failure of a probe after the start surfaces as ``crash``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_probes import (
    ActivationOutlierMonitor,
    ActivationStatsMonitor,
    AlignmentMonitor,
    AttentionMonitor,
    AugmentationInvarianceMonitor,
    ConfidenceMonitor,
    CurvatureMonitor,
    GradientDynamicsMonitor,
    GradientNoiseScaleMonitor,
    GradientStatsMonitor,
    LayerCorrelationMonitor,
    NoiseRobustnessMonitor,
    PerSampleGradientMonitor,
    StabilityMonitor,
)
from lightning_probes.callbacks.analysis_base import AnalysisProbe
from lightning_probes.callbacks.guard import ProbeWarning
from lightning_probes.errors import ProbeConfigurationError
from tests.matrix_cases import CASES, Case

PROBES = (GradientStatsMonitor, GradientDynamicsMonitor, ConfidenceMonitor, NoiseRobustnessMonitor,
          LayerCorrelationMonitor, ActivationStatsMonitor, AugmentationInvarianceMonitor, AlignmentMonitor,
          ActivationOutlierMonitor, AttentionMonitor, StabilityMonitor, GradientNoiseScaleMonitor,
          CurvatureMonitor, PerSampleGradientMonitor)


#: The curvature probes with fewer Hessian-vector products and samples than their defaults: the same code paths
#: (probe batch, per-sample pass, Lanczos, Hutchinson, alpha, TIC), a fraction of the suite's time.
FEWER_PRODUCTS = {"CurvatureMonitor": dict(num_samples=16, lanczos_iters=3, trace_samples=2),
                  "PerSampleGradientMonitor": dict(num_samples=8, curvature_samples=2)}


def make_probes(case: Case, classes: list[type]) -> list[Any]:
    probes = []
    for cls in classes:
        kwargs = {**FEWER_PRODUCTS.get(cls.__name__, {}), **case.probe_kwargs.get(cls.__name__, {})}
        if issubclass(cls, AnalysisProbe):
            kwargs = {**case.probe_kwargs.get("*analysis", {}), **kwargs}
        probes.append(cls(**kwargs))
    return probes


def make_trainer(case: Case, root: Path, probes: list[Any], args: argparse.Namespace, **extra: Any) -> pl.Trainer:
    settings = dict(max_epochs=2, limit_train_batches=4, default_root_dir=str(root), enable_progress_bar=False,
                    enable_model_summary=False, log_every_n_steps=1, accelerator=args.accelerator, devices=1)
    if args.precision:
        settings["precision"] = args.precision
    settings.update(case.trainer)
    settings.update(extra)
    return pl.Trainer(callbacks=list(probes), **settings)


def run(case: Case, root: Path, probes: list[Any], args: argparse.Namespace) -> pl.Trainer:
    val = case.val() if case.val is not None else None
    if case.entry in ("validate", "test", "predict"):
        trainer = make_trainer(case, root, probes, args)
        module = case.model()
        if case.entry == "validate":
            trainer.validate(module, val)
        elif case.entry == "test":
            trainer.test(module, val)
        else:
            trainer.predict(module, val)
        return trainer
    if case.entry == "resume":
        first = make_trainer(case, root / "first", make_probes(case, [type(p) for p in probes]), args, max_epochs=1)
        first.fit(case.model(), case.train(), val)
        checkpoint = first.checkpoint_callback.best_model_path
        trainer = make_trainer(case, root, probes, args)
        trainer.fit(case.model(), case.train(), case.val() if case.val else None, ckpt_path=checkpoint)
        return trainer
    if case.entry == "refit":
        first = make_trainer(case, root / "first", probes, args, max_epochs=1)
        first.fit(case.model(), case.train(), val)
        trainer = make_trainer(case, root, probes, args)  # the same probe instances, a new Trainer
        trainer.fit(case.model(), case.train(), case.val() if case.val else None)
        return trainer
    trainer = make_trainer(case, root, probes, args)
    trainer.fit(case.model(), case.train(), val)
    return trainer


def _first_nonfinite(value: Any, path: str = "") -> str | None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, (int, float)):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _first_nonfinite(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def status_of(probe: Any, probes_dir: Path, caught: list[warnings.WarningMessage], fits: int = 1) -> tuple[str, str]:
    """The probe's status; ``fits``: the runs of the case (2 for a resume or a second fit), each of which may skip
    the probe once (one warning each; the resumed history keeps the first run's skip record)."""
    prefix = f"{type(probe).__name__} {probe.name!r}"
    own = [str(w.message) for w in caught if issubclass(w.category, ProbeWarning)
           and str(w.message).startswith(prefix)]
    path = probes_dir / f"{probe.name}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    disabled = [r for r in records if r.get("probe_status") == "disabled"]
    skipped = [r for r in records if r.get("probe_status") == "skipped"]
    if disabled:
        return "disabled", disabled[0]["reason"]
    if skipped:
        if 1 <= len(skipped) <= fits and len(own) == fits and len(records) == len(skipped):
            return "skipped", skipped[0]["reason"]
        return "warnings", f"{len(skipped)} skip records, {len(own)} warnings, {len(records)} records"
    if own:
        return "warnings", own[0][:300]
    if not records:
        return "idle", ""
    for record in records:
        bad = _first_nonfinite(record)
        if bad:
            return "nonfinite", f"{bad} in {json.dumps(record)[:300]}"
    return "ok", f"{len(records)} records"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases", help="case names, comma-separated: " + ", ".join(CASES))
    parser.add_argument("output")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--per-case-dirs", action="store_true", help="OUTPUT_DIR/<CASE>/ even for one case")
    args = parser.parse_args(argv)
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}")
    torch.set_num_threads(1)
    for name in names:
        out = Path(args.output) if len(names) == 1 and not args.per_case_dirs else Path(args.output) / name
        run_one(name, out, args)
    return 0


def run_one(name: str, out: Path, args: argparse.Namespace) -> None:
    """Run case ``name`` with every probe (again without each probe that refuses it); write its result."""
    case = CASES[name]
    classes = list(PROBES)
    refused: dict[str, str] = {}
    result: dict[str, Any] = {"case": name, "probes": {}, "details": {}}
    for _attempt in range(len(PROBES) + 1):
        root = out / f"attempt{len(refused)}"
        shutil.rmtree(root, ignore_errors=True)
        pl.seed_everything(0, workers=True)
        probes = make_probes(case, classes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trainer = run(case, root, probes, args)
            except Exception as err:  # noqa: BLE001 - reported in the result
                message = f"{type(err).__name__}: {err}"
                named = [cls for cls in classes if message.startswith(f"{type(err).__name__}: {cls.__name__}")]
                if isinstance(err, ProbeConfigurationError) and named:
                    refused[named[0].__name__] = message
                    classes.remove(named[0])
                    continue
                notes = " ".join(getattr(err, "__notes__", ()))
                culprits = [cls for cls in classes if f"raised in {cls.__name__} " in notes] or classes
                for cls in classes:
                    result["probes"][cls.__name__] = "crash" if cls in culprits else "not reached"
                    result["details"][cls.__name__] = (message + " " + notes)[:2000] if cls in culprits else ""
                result["traceback"] = traceback.format_exc()[-4000:]
                trainer = None
                break
        if trainer is None:
            break
        probes_dir = Path(trainer.log_dir or root) / "probes"
        for probe in probes:
            status, detail = status_of(probe, probes_dir, caught, 2 if case.entry in ("resume", "refit") else 1)
            result["probes"][type(probe).__name__] = status
            result["details"][type(probe).__name__] = detail
        result["global_step"] = trainer.global_step
        break
    for name, message in refused.items():
        result["probes"][name] = "refused"
        result["details"][name] = message[:2000]
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("LIGHTNING_PROBES_ON_ERROR", "raise")
    sys.exit(main())
