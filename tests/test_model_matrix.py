"""The suite's own model matrix: every probe at its defaults on realistic models, Trainer settings and entry points.

Each group of cases runs in one subprocess (`tests/matrix_run.py`, torch imported once per group) with a timeout
that kills the whole process group. Every case must exit cleanly, and each probe must end in the state this
table expects: ``ok`` (finite records), ``skipped`` (exactly one warning and one skip record), ``refused`` (one
error naming the probe, before any step) or ``idle`` (the entry point gives it nothing to do, and it says
nothing). Any other outcome (a crash, a disabled probe, a non-finite number, a stray warning) fails the case.
``docs/choices.md`` says why each skip and refusal is the right answer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import run_in_new_session
from tests.matrix_cases import CASES
from tests.matrix_run import PROBES

ROOT = Path(__file__).resolve().parents[1]
NAMES = [cls.__name__ for cls in PROBES]
GRADIENT = ("GradientStatsMonitor", "GradientDynamicsMonitor")
REPRESENTATION = ("LayerCorrelationMonitor", "ActivationStatsMonitor", "AugmentationInvarianceMonitor",
                  "AlignmentMonitor")
ALL_IDLE = dict.fromkeys(NAMES, "idle")
TOKEN_MODELS = ("lstm", "gru_dict_batches", "embedding_bag", "tied_embeddings", "multihead_attention",
                "demo_transformer", "language_model_vocab")
#: Cases whose model holds an nn.MultiheadAttention (torchvision's ViT, Lightning's demo Transformer, ...).
ATTENTION_MODELS = ("vit_tiny", "multihead_attention", "demo_transformer")


def expected(case: str) -> dict[str, str]:
    """What each probe must end as in ``case``."""
    table = dict.fromkeys(NAMES, "ok")
    if case == "validate_only":
        table.update(dict.fromkeys(GRADIENT + REPRESENTATION, "idle"))
        table["ActivationOutlierMonitor"] = "idle"  # it watches training batches only
    elif case == "test_only":
        table = {**ALL_IDLE, "ConfidenceMonitor": "ok"}
    elif case == "predict_only":
        table = dict(ALL_IDLE)
    elif case == "no_validation":
        table.update({"ConfidenceMonitor": "idle", "NoiseRobustnessMonitor": "skipped",
                      **dict.fromkeys(REPRESENTATION, "skipped")})
    elif case == "max_steps_mid_epoch":  # training stops before the first validation epoch
        table.update({"ConfidenceMonitor": "idle", "NoiseRobustnessMonitor": "idle"})
    elif case == "one_val_sample":  # correlations, invariance and alignment need two samples
        table.update(dict.fromkeys(("LayerCorrelationMonitor", "AugmentationInvarianceMonitor", "AlignmentMonitor"),
                                   "skipped"))
    if case in TOKEN_MODELS or case == "conv1d":
        table["AugmentationInvarianceMonitor"] = "skipped"  # the default image augmentation cannot apply
    if case == "boring_model":  # Lightning's BoringModel: its validation_step returns no logits or targets
        table.update({"ConfidenceMonitor": "refused", "AugmentationInvarianceMonitor": "skipped"})
    if case == "language_model_vocab":  # logits (N, V, T): the classes axis of 3-D logits is ambiguous
        table["NoiseRobustnessMonitor"] = "skipped"
    if case == "one_big_tensor":
        table["AlignmentMonitor"] = "skipped"  # no nn.Linear / nn.Conv layer: alignment is about their weights
    if case in ("validate_only", "test_only", "predict_only"):
        table["AttentionMonitor"] = "idle"  # it watches training batches only
    elif case not in ATTENTION_MODELS:
        table["AttentionMonitor"] = "skipped"  # no nn.MultiheadAttention (SDPA modules are observed when named)
    if case == "validate_only":
        table["StabilityMonitor"] = "idle"  # it watches optimiser steps only
    elif case == "gan_manual_two_optimizers":
        table["StabilityMonitor"] = "skipped"  # manual optimisation: no one loss per automatic optimiser step
    # Two batch sizes need gradient accumulation (or DDP): every one-device fit without accumulation skips it.
    if case in ("validate_only", "test_only", "predict_only"):
        table["GradientNoiseScaleMonitor"] = "idle"
    elif case != "accumulation":
        table["GradientNoiseScaleMonitor"] = "skipped"
    # The default loss_fn (cross entropy of module(batch[0]) against class indices batch[1]) does not fit these
    # batches; mobilenet's hardsigmoid has no second derivative (no Hessian-vector product).
    if case in ("validate_only", "test_only", "predict_only"):
        table["CurvatureMonitor"] = "idle"
    elif case in ("boring_model", "gru_dict_batches", "binary_one_logit", "segmentation",
                  "gan_manual_two_optimizers", "mobilenet_v3_small"):
        table["CurvatureMonitor"] = "skipped"
    # The same default loss_fn; manual optimisation has no one loss per step. Mobilenet runs without its TIC (its
    # records say curvature_unavailable: hardsigmoid has no second derivative).
    if case in ("validate_only", "test_only", "predict_only"):
        table["PerSampleGradientMonitor"] = "idle"
    elif case in ("boring_model", "gru_dict_batches", "binary_one_logit", "segmentation", "gan_manual_two_optimizers"):
        table["PerSampleGradientMonitor"] = "skipped"
    return table


#: Groups of cases, one subprocess each (about a minute each on one core).
GROUPS = [list(CASES)[i::8] for i in range(8)]


def _run_group(cases: list[str], out: Path, timeout: float = 540) -> None:
    run_in_new_session([sys.executable, "-m", "tests.matrix_run", ",".join(cases), str(out), "--per-case-dirs"],
                       timeout, f"the matrix group {cases}", env={"LIGHTNING_PROBES_ON_ERROR": "raise"})


@pytest.mark.parametrize("cases", GROUPS, ids=[f"group{i}" for i in range(len(GROUPS))])
def test_every_probe_at_its_defaults(cases, tmp_path):
    out = tmp_path / "matrix"
    _run_group(cases, out)
    problems = []
    for case in cases:
        path = out / case / "result.json"
        assert path.exists(), f"{case} wrote no result"
        result = json.loads(path.read_text())
        want = expected(case)
        for probe, status in result["probes"].items():
            if status != want[probe]:
                problems.append(f"{case:26s} {probe:30s} {status:10s} (expected {want[probe]}): "
                                f"{result['details'][probe][:400]}")
        if "traceback" in result:
            problems.append(f"{case}: {result['traceback'][-1500:]}")
    assert not problems, "\n".join(problems)


def test_the_matrix_covers_what_the_issue_lists():
    assert len(CASES) >= 25
    for needed in ("resnet18", "boring_model", "vit_tiny", "segmentation", "lstm", "gru_dict_batches",
                   "multihead_attention", "demo_transformer", "frozen_and_unused", "tied_embeddings", "lazy_modules",
                   "configure_model", "conv1d", "gan_manual_two_optimizers", "gradient_clipping", "accumulation",
                   "bf16_mixed", "double_precision", "two_val_loaders", "no_validation", "fast_dev_run",
                   "val_check_interval", "validate_only", "test_only", "predict_only", "resume_from_checkpoint",
                   "second_fit_same_probes", "max_steps_mid_epoch", "iterable_dataset"):
        assert needed in CASES
