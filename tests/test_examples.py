"""Every script in ``examples/`` runs, on tiny settings, and leaves what it promises."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest

from lightning_probes import read_probes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, monkeypatch, *argv: str) -> dict:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_every_example_is_tested():
    tested = {"plain_trainer.py", "two_inputs.py", "dict_batches.py", "read_and_plot.py", "study_from_python.py",
              "training_health.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_plain_trainer_then_read_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_example("plain_trainer.py", monkeypatch, "--output", "runs", "--max_epochs", "1", "--limit_batches", "4")
    (run,) = (tmp_path / "runs" / "plain_trainer").glob("version_*")
    table = read_probes(run)
    assert set(table.probe) == {"gradient_stats", "gradient_dynamics", "confidence", "noise_robustness",
                                "layer_correlation", "activation_stats", "augmentation_invariance", "alignment"}
    run_example("read_and_plot.py", monkeypatch, str(run), "--output", "summary.png")
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_inputs_with_forward_fn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_example("two_inputs.py", monkeypatch, "--output", "runs", "--max_epochs", "1")
    (run,) = (tmp_path / "runs" / "two").glob("version_*")
    table = read_probes(run)
    layers = set(table[table.probe == "activation_stats"].layer)
    assert {"image.2", "side.1", "head"} <= layers  # both input branches were run by forward_fn
    noise = table[table.probe == "noise_robustness"]
    assert len(noise) == 1 and 0.0 <= noise.stability_ratio_mean.iloc[0] <= 1.0
    # The batch's second element is the side vector, not labels: no correct/wrong split (as docs/own-model.md says).
    assert noise.stability_ratio_mean_correct.isna().all()


def test_dict_batches_with_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_example("dict_batches.py", monkeypatch, "--output", "runs", "--max_epochs", "1", "--limit_batches", "4")
    (run,) = (tmp_path / "runs" / "dict_batches").glob("version_*")
    table = read_probes(run)
    confidence = table[table.probe == "confidence"]
    assert confidence.n.iloc[-1] == 4 * 64  # four validation batches of 64
    noise = table[table.probe == "noise_robustness"]
    assert noise.stability_ratio_mean_correct.notna().all()  # labels found through target_key
    assert set(table[table.probe == "layer_correlation"].layer_a) == {"net.2", "net.3"}  # ReLU out, classifier


def test_study_from_python(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_example("study_from_python.py", monkeypatch, "--output", "study", "--limit_batches", "2")
    assert namespace["__name__"] == "__main__"
    trials = pd.read_csv(tmp_path / "study" / "trials.csv")
    assert sorted(trials["model.init_args.lr"]) == [0.02, 0.1] and set(trials.status) == {"finished"}
    assert (tmp_path / "study" / "summary.md").exists()


@pytest.mark.parametrize("name", ["plain_trainer.py", "two_inputs.py", "dict_batches.py", "read_and_plot.py",
                                  "study_from_python.py"])
def test_examples_have_a_docstring_and_help(name):
    source = (EXAMPLES / name).read_text()
    assert source.startswith('"""') and "argparse" in source


def test_training_health_every_probe_and_the_spike(tmp_path, monkeypatch, tiny_data):
    monkeypatch.chdir(tmp_path)
    run_example("training_health.py", monkeypatch, "--data_dir", str(tiny_data), "--output", "runs", "--every", "1",
                "--spike_at", "3", "--spike_steps", "2", "--limit_batches", "16")
    (run,) = (tmp_path / "runs" / "training_health").glob("version_*")
    table = read_probes(run)
    assert {"stability", "gradient_dynamics", "activation_outliers", "attention",
            "gradient_noise_scale"} <= set(table.probe)
    steps = table[(table.probe == "stability") & (table.kind == "step")]
    assert len(steps) >= 1 and steps.loss.notna().all()  # the tiny split gives a step or two
    assert table[table.probe == "gradient_dynamics"].update_ratio.notna().any()
    for figure in ("training_health", "attention", "activation_outliers", "stability"):
        assert (run / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
