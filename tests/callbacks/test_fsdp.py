"""The gradient probes under FSDP2 (2 CPU processes, gloo) report what the same model reports under DDP.

Each run is a script in its own process group, killed whole after a timeout: a collective entered by one rank
only would otherwise hang the suite (the other rank keeps the port).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import read, run_in_new_session

ROOT = Path(__file__).parents[2]
TIMEOUT = 300
GRADIENT_PROBES = ["gradient_stats", "gradient_dynamics", "gradient_dynamics_sampled", "gradient_stats_every_3"]


def run(out: Path, kind: str, probes: list[str]) -> Path:
    """Run ``tests/fsdp_run.py`` in a new session; on timeout kill its whole process group and fail."""
    out.mkdir(parents=True, exist_ok=True)
    run_in_new_session([sys.executable, str(ROOT / "tests" / "fsdp_run.py"), str(out), kind, ",".join(probes)],
                       TIMEOUT, f"the {kind} run")
    return out


def _same(a, b, key):
    if a is None or b is None or isinstance(a, (bool, str)):
        assert a == b, key
    else:
        assert a == pytest.approx(b, rel=1e-5, abs=1e-9), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    return run(base / "ddp", "ddp", GRADIENT_PROBES), run(base / "fsdp2", "fsdp2", GRADIENT_PROBES)


@pytest.mark.parametrize("name", GRADIENT_PROBES)
def test_fsdp2_records_equal_the_ddp_records(runs, name):
    ddp, fsdp = (read(out / f"{name}.jsonl") for out in runs)
    assert len(ddp) == len(fsdp) > 0
    assert [(r["step"], r["layer"]) for r in ddp] == [(r["step"], r["layer"]) for r in fsdp]  # model's own names
    assert {r["layer"] for r in fsdp} == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias",
                                          "net.5.weight", "net.5.bias", "__total__"}
    for a, b in zip(ddp, fsdp):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key], (name, a["step"], a["layer"], key))
    if name.startswith("gradient_dynamics"):
        assert any(r["sign_flip_fraction"] for r in fsdp)  # the comparison ran, not only zeros
        assert any(r["has_previous"] for r in fsdp)
        assert all(r["init_distance"] > 0 and r["update_ratio"] > 0 for r in fsdp)  # equal to DDP's, above


def test_fsdp2_headlines_and_files_equal_ddp(runs):
    import json

    ddp, fsdp = runs
    flows = [json.loads((out / "gradient_stats" / "gradient_flow.json").read_text()) for out in runs]
    for window in ("first", "last"):
        for stat in ("mean", "std"):
            assert flows[1][window][stat] == pytest.approx(flows[0][window][stat], rel=1e-5)
    metrics = [json.loads((fsdp / f"callback_metrics_rank{r}.json").read_text()) for r in (0, 1)]
    reference = json.loads((ddp / "callback_metrics_rank0.json").read_text())
    for key in ("gradient_stats/grad_norm/__total__", "gradient_dynamics/epoch_mean_sign_flip_fraction/__total__"):
        assert metrics[0][key] == metrics[1][key] == pytest.approx(reference[key], rel=1e-5), key
    assert not list(fsdp.glob("*.20*.jsonl"))  # one writer


def test_sampled_records_follow_max_entries(runs):
    records = read(runs[1] / "gradient_dynamics_sampled.jsonl")
    sampled = {r["layer"]: r["sampled_entries"] for r in records}
    assert sampled["net.1.weight"] == 7 and sampled["net.1.bias"] == 7 and sampled["net.5.bias"] == 7
    assert sampled["__total__"] == 6 * 7
    for r in records:
        assert 0 <= r["zero_count"] <= 7 * (6 if r["layer"] == "__total__" else 1)


ALL_PROBES = ["gradient_stats", "gradient_dynamics", "confidence", "noise_robustness", "layer_correlation",
              "activation_stats", "alignment", "augmentation_invariance"]


def test_every_probe_together_under_fsdp2_finishes(runs, tmp_path):
    """All eight probes in one FSDP2 run: no collective is left waiting (the run ends within the timeout), each
    probe writes its records once, and the other probes' passes leave the gradient records as they were."""
    out = run(tmp_path / "all", "fsdp2", ALL_PROBES)
    for name in ALL_PROBES:
        records = read(out / f"{name}.jsonl")
        assert records, name
        assert len({json_key(r) for r in records}) == len(records), name  # none written twice
    for name in ("gradient_stats", "gradient_dynamics"):
        alone = read(runs[1] / f"{name}.jsonl")
        together = read(out / f"{name}.jsonl")
        assert [(r["step"], r["layer"]) for r in alone] == [(r["step"], r["layer"]) for r in together]
        for a, b in zip(alone, together):
            for key in a:
                _same(a[key], b[key], (name, a["step"], a["layer"], key))


def json_key(record: dict) -> str:
    import json

    return json.dumps(record, sort_keys=True)
