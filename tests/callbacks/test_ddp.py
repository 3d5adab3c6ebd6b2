"""Every probe under DDP with 2 CPU processes (gloo): no deadlock, rank 0 writes, no duplicate records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import read

ROOT = Path(__file__).parents[2]


def run_ddp(tmp_path: Path, probes: list[str]) -> Path:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_run.py"), str(tmp_path), ",".join(probes)],
                            env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path


def test_gradient_probes_under_ddp(tmp_path):
    out = run_ddp(tmp_path, ["gradient_stats", "gradient_dynamics"])
    # 96 samples over 2 ranks in batches of 16: 3 optimiser steps per epoch, 2 epochs.
    for name in ("gradient_stats", "gradient_dynamics"):
        records = read(out / f"{name}.jsonl")
        keys = [(r["step"], r["layer"]) for r in records]
        assert len(keys) == len(set(keys)), name
        assert sorted({r["step"] for r in records}) == list(range(6)), name
    totals = [r for r in read(out / "gradient_dynamics.jsonl") if r["layer"] == "__total__"]
    assert [r["has_previous"] for r in totals] == [False] + [True] * 5
    assert not list(out.glob("*.20*.jsonl"))  # no second writer moved a file aside


def test_prediction_probes_under_ddp(tmp_path):
    out = run_ddp(tmp_path, ["confidence", "noise_robustness"])
    records = read(out / "confidence.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]  # one record per epoch, written once
    for r in records:
        # Each rank sees 16 of the 32 validation samples; the reduced matrix counts each exactly once.
        assert sum(map(sum, r["confusion_matrix"])) == 32 == r["n"]
    assert [r["epoch"] for r in read(out / "noise_robustness.jsonl")] == [0, 1]
    _assert_same_headline(out, ["noise_robustness/stability_ratio_mean"])


def test_representation_probes_under_ddp(tmp_path):
    out = run_ddp(tmp_path, ["layer_correlation", "activation_stats", "augmentation_invariance", "alignment"])
    for name in ("layer_correlation", "activation_stats", "augmentation_invariance", "alignment"):
        records = read(out / f"{name}.jsonl")
        assert sorted({r["epoch"] for r in records}) == [0, 1, 2], name  # rank 0 only: no duplicates
        key = "layer_b" if name == "layer_correlation" else "layer"
        rows = [(r["epoch"], r.get("layer_a"), r[key]) for r in records]
        assert len(rows) == len(set(rows)), name
    _assert_same_headline(out, ["layer_correlation/cka_adjacent_mean", "activation_stats/dead_fraction",
                                "augmentation_invariance/invariance_mean", "alignment/mean"])


def _assert_same_headline(out: Path, keys: list[str]) -> None:
    """Rank 0's headline scalars reached rank 1 (broadcast), without a deadlock."""
    ranks = [json.loads((out / f"callback_metrics_rank{r}.json").read_text()) for r in (0, 1)]
    for key in keys:
        assert key in ranks[0] and ranks[0][key] == ranks[1][key], key
