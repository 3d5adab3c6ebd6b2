"""Representation and prediction probes under FSDP2 (2 CPU processes, gloo) record what they record under DDP.

Under FSDP2 every forward pass all-gathers each layer's weights, a collective every rank must enter: the analysis
probes then run their passes on every rank (rank 0's probe set, broadcast once) and only rank 0 writes.
AlignmentMonitor gathers each weight with ``DTensor.full_tensor()`` on every rank. Each run is a script in its own
process group, killed whole after a timeout (`tests.callbacks.test_fsdp.run`).
"""

from __future__ import annotations

import json

import pytest

from tests.callbacks.test_fsdp import run
from tests.helpers import read

PROBES = ["layer_correlation", "activation_stats", "alignment", "augmentation_invariance", "confidence",
          "noise_robustness"]


def _close(a, b, where):
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _close(a[key], b[key], (*where, key))
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, (*where, i))
    elif a is None or b is None or isinstance(a, (bool, str)):
        assert a == b, where
    else:
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), where


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp_representations")
    return run(base / "ddp", "ddp", PROBES), run(base / "fsdp2", "fsdp2", PROBES)


@pytest.mark.parametrize("name", PROBES)
def test_fsdp2_records_equal_the_ddp_records(runs, name):
    ddp, fsdp = (read(out / f"{name}.jsonl") for out in runs)
    assert len(ddp) == len(fsdp) > 0  # rank 0 wrote each record once
    for a, b in zip(ddp, fsdp):
        _close(a, b, (name,))


def test_fsdp2_headlines_reach_every_rank(runs):
    ddp, fsdp = runs
    reference = json.loads((ddp / "callback_metrics_rank0.json").read_text())
    ranks = [json.loads((fsdp / f"callback_metrics_rank{r}.json").read_text()) for r in (0, 1)]
    for key in ("layer_correlation/cka_adjacent_mean", "activation_stats/dead_fraction", "alignment/mean",
                "augmentation_invariance/invariance_mean", "noise_robustness/stability_ratio_mean"):
        assert ranks[0][key] == ranks[1][key] == pytest.approx(reference[key], rel=1e-4), key
