"""Crash and resume for real: ``kill -9`` a ``lightning fit`` subprocess twice, resume from its checkpoint, and
check that every probe record of an uninterrupted run is there exactly once.

Two layouts: the default auto-versioned TensorBoardLogger (each resume writes ``version_N+1``: the probes copy
the history into it) and a fixed logger version (the probes cut their files back in place).
"""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEY_FIELDS = ("stage", "epoch", "step", "layer", "layer_a", "layer_b", "optimizer", "dataloader_idx")
PROBES = ("gradient_stats", "gradient_dynamics", "confidence", "noise_robustness", "layer_correlation",
          "activation_stats", "augmentation_invariance", "alignment")

CONFIG = """
seed_everything: 7
trainer:
  max_epochs: 5
  accelerator: cpu
  limit_train_batches: 6
  limit_val_batches: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args: {{save_dir: "{save_dir}", name: "{name}"{version}}}
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {{every_n_epochs: 1, save_last: true, save_top_k: -1}}
    - class_path: tests.crash.PauseAt
    - class_path: lightning_probes.GradientStatsMonitor
      init_args: {{every_n_steps: 2}}
    - class_path: lightning_probes.GradientDynamicsMonitor
      init_args: {{every_n_steps: 3}}
    - class_path: lightning_probes.ConfidenceMonitor
      init_args: {{plot_every_n_epochs: 10}}
    - class_path: lightning_probes.NoiseRobustnessMonitor
      init_args: {{num_samples: 20, num_draws: 3, every_n_epochs: 2}}
    - class_path: lightning_probes.LayerCorrelationMonitor
      init_args: {{num_samples: 32, every_n_epochs: 2}}
    - class_path: lightning_probes.ActivationStatsMonitor
      init_args: {{num_samples: 32, every_n_epochs: 3}}
    - class_path: lightning_probes.AugmentationInvarianceMonitor
      init_args: {{num_views: 4, every_n_epochs: 5}}
    - class_path: lightning_probes.AlignmentMonitor
      init_args: {{num_samples: 32, every_n_epochs: 2}}
model:
  class_path: MLP
  init_args: {{hidden: [32, 16, 16], lr: 0.05}}
data:
  class_path: DigitsDataModule
  init_args: {{batch_size: 32}}
"""


def _write_config(tmp_path: Path, name: str, fixed_version: bool) -> Path:
    path = tmp_path / f"{name}.yaml"
    version = ", version: 0" if fixed_version else ""
    path.write_text(CONFIG.format(save_dir=tmp_path / "runs", name=name, version=version))
    return path


def _env(pause_at: str | None, marker: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "LP_PAUSE_MARKER": str(marker), "PYTHONWARNINGS": "ignore"}
    env.pop("LP_PAUSE_AT", None)
    if pause_at:
        env["LP_PAUSE_AT"] = pause_at
    return env


def _fit(config: Path, tmp_path: Path, ckpt: Path | None = None, kill_at: str | None = None) -> None:
    """Run ``lightning fit``; with ``kill_at`` ("epoch:batch"), SIGKILL it when it reaches that batch."""
    marker = tmp_path / "paused"
    marker.unlink(missing_ok=True)
    args = [sys.executable, "-m", "lightning_probes.cli", "fit", "--config", str(config)]
    if ckpt is not None:
        args += ["--ckpt_path", str(ckpt)]
    log = open(tmp_path / "fit.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(kill_at, marker), stdout=log, stderr=log)
    try:
        if kill_at is None:
            assert proc.wait(timeout=400) == 0, (tmp_path / "fit.log").read_text()[-3000:]
            return
        deadline = time.monotonic() + 400
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "fit.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the pause point"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def _keys(path: Path) -> collections.Counter:
    keys = collections.Counter()
    for line in path.read_text().splitlines():
        record = json.loads(line)
        keys[tuple((k, record[k]) for k in KEY_FIELDS if k in record)] += 1
    return keys


@pytest.mark.parametrize("fixed_version", [False, True], ids=["auto_version", "fixed_version"])
def test_kill_twice_and_resume_keeps_every_record_once(tmp_path, fixed_version, monkeypatch):
    from lightning_probes.cli import main

    monkeypatch.chdir(tmp_path)  # the uninterrupted reference runs in this process (no second import cost)
    main(["fit", "--config", str(_write_config(tmp_path, "reference", fixed_version))])
    crash = _write_config(tmp_path, "crash", fixed_version)
    runs = tmp_path / "runs" / "crash"
    # First crash in epoch 2: the last checkpoint is from epoch 1; records of epoch 2 exist past it.
    _fit(crash, tmp_path, kill_at="2:3")
    first = runs / "version_0"
    assert (first / "checkpoints" / "last.ckpt").exists()
    # Second crash in epoch 4, before the rarely-writing probes (augmentation invariance) write again.
    _fit(crash, tmp_path, ckpt=first / "checkpoints" / "last.ckpt", kill_at="4:2")
    second = runs / ("version_0" if fixed_version else "version_1")
    _fit(crash, tmp_path, ckpt=second / "checkpoints" / "last.ckpt")
    final = runs / ("version_0" if fixed_version else "version_2")

    expected_dir = tmp_path / "runs" / "reference" / "version_0" / "probes"
    for probe in PROBES:
        expected = _keys(expected_dir / f"{probe}.jsonl")
        got = _keys(final / "probes" / f"{probe}.jsonl")
        assert expected, probe
        duplicated = [k for k, n in got.items() if n > 1]
        assert not duplicated, f"{probe}: records written twice: {duplicated[:3]}"
        assert got == expected, (f"{probe}: missing {sorted(set(expected) - set(got))[:3]}, "
                                 f"extra {sorted(set(got) - set(expected))[:3]}")
    # The history's artifacts came along, and the crashed runs' own files were not touched.
    assert (final / "probes" / "noise_robustness").is_dir()
    # Figures and summaries drawn from the history cover the run from its first epoch.
    corr = json.loads((final / "probes" / "layer_correlation" / "corr_means.json").read_text())
    reference = json.loads((expected_dir / "layer_correlation" / "corr_means.json").read_text())
    assert corr["epochs"] == reference["epochs"] and corr["epochs"][0] == 0
    assert (final / "probes" / "gradient_dynamics" / "gradient_dynamics.png").is_file()
    if not fixed_version:
        assert sorted(p.name for p in (final / "probes").glob("*.jsonl")) == sorted(f"{p}.jsonl" for p in PROBES)
        first_epochs = {json.loads(line)["epoch"] for line in
                        (first / "probes" / "gradient_stats.jsonl").read_text().splitlines()}
        assert max(first_epochs) == 2  # the crashed run's records past its checkpoint are still there

    from lightning_probes import read_probes

    table = read_probes(final)
    assert set(table["probe"]) == set(PROBES)
    assert table[table.probe == "gradient_stats"]["step"].min() == 0


BETWEEN_FLUSHES = """
seed_everything: 7
trainer:
  max_epochs: 3
  accelerator: cpu
  limit_train_batches: 6
  limit_val_batches: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args: {{save_dir: "{save_dir}", name: "{name}"}}
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: 4, save_last: true, save_top_k: -1}}
    - class_path: tests.crash.PauseAt
    - class_path: lightning_probes.GradientStatsMonitor
      init_args: {{every_n_steps: 1, flush_every_n_steps: {flush}, flush_secs: null}}
    - class_path: lightning_probes.GradientDynamicsMonitor
      init_args: {{every_n_steps: 1, flush_every_n_steps: {flush}, flush_secs: null}}
    - class_path: lightning_probes.ConfidenceMonitor
      init_args: {{plot_every_n_epochs: 0, flush_every_n_steps: {flush}, flush_secs: null}}
model:
  class_path: MLP
  init_args: {{hidden: [32, 16, 16], lr: 0.05}}
data:
  class_path: DigitsDataModule
  init_args: {{batch_size: 32}}
"""
FLUSH = 5


def _ordered_keys(path: Path) -> list[tuple]:
    return [tuple((k, r[k]) for k in KEY_FIELDS if k in r) for r in map(json.loads, path.read_text().splitlines())]


def test_kill_between_flushes_loses_at_most_one_interval_and_a_resume_restores_every_record(tmp_path, monkeypatch):
    """Records are written every `FLUSH` steps, at epoch ends and before each checkpoint (every 4 steps). The run
    is killed at step 10 of 18: steps 8-9 exist only in memory, the last checkpoint is at step 8."""
    from lightning_probes.cli import main

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(BETWEEN_FLUSHES.format(save_dir=tmp_path / "runs", name=name, flush=FLUSH))
        return path

    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(config("reference"))])
    crash = config("crash")
    _fit(crash, tmp_path, kill_at="1:4")  # epoch 1, batch 4: global step 10, before its records
    killed = tmp_path / "runs" / "crash" / "version_0"
    assert torch_load_step(killed / "checkpoints" / "last.ckpt") == 8
    reference = tmp_path / "runs" / "reference" / "version_0" / "probes"
    kill_step = 10
    for probe in ("gradient_stats", "gradient_dynamics"):
        expected = [k for k in _ordered_keys(reference / f"{probe}.jsonl") if dict(k)["step"] < kill_step]
        on_disk = _ordered_keys(killed / "probes" / f"{probe}.jsonl")
        assert on_disk == expected[:len(on_disk)], f"{probe}: not an exact prefix of the uninterrupted history"
        lost = {dict(k)["step"] for k in expected[len(on_disk):]}
        assert lost and min(lost) >= kill_step - FLUSH, f"{probe}: lost steps {sorted(lost)}"
        assert lost == {8, 9}  # written through the checkpoint at step 8, nothing after it
    # The epoch-level probe wrote epoch 0 at its end.
    assert [dict(k)["epoch"] for k in _ordered_keys(killed / "probes" / "confidence.jsonl")] == [0]

    _fit(crash, tmp_path, ckpt=killed / "checkpoints" / "last.ckpt")
    final = tmp_path / "runs" / "crash" / "version_1" / "probes"
    for probe in ("gradient_stats", "gradient_dynamics", "confidence"):
        expected = _keys(reference / f"{probe}.jsonl")
        got = _keys(final / f"{probe}.jsonl")
        assert expected and not [k for k, n in got.items() if n > 1], probe
        assert got == expected, (f"{probe}: missing {sorted(set(expected) - set(got))[:3]}, "
                                 f"extra {sorted(set(got) - set(expected))[:3]}")


def torch_load_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


HEALTH = """
seed_everything: 7
trainer:
  max_epochs: 3
  accelerator: cpu
  limit_train_batches: 6
  limit_val_batches: 0
  accumulate_grad_batches: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args: {{save_dir: "{save_dir}", name: "{name}"}}
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {{every_n_epochs: 1, save_last: true, save_top_k: -1}}
    - class_path: tests.crash.PauseAt
    - class_path: lightning_probes.StabilityMonitor
      init_args: {{every_n_steps: 1, window: 4, warmup: 2}}
    - class_path: lightning_probes.GradientNoiseScaleMonitor
      init_args: {{every_n_steps: 1, log_every_n_steps: 2}}
    - class_path: lightning_probes.CurvatureMonitor
      init_args: {{every_n_steps: 2, num_samples: 16, lanczos_iters: 3, trace_samples: 2}}
    - class_path: lightning_probes.PerSampleGradientMonitor
      init_args: {{every_n_steps: 2, num_samples: 8, curvature_samples: 2}}
model:
  class_path: MLP
  init_args: {{hidden: [32, 16, 16], lr: 0.05}}
data:
  class_path: tests.crash.EpochSeededDigits
  init_args: {{batch_size: 32}}
"""
HEALTH_PROBES = ("stability", "gradient_noise_scale", "curvature", "per_sample_gradients")


def _records(path: Path) -> dict[tuple, dict]:
    """The records by key (``kind`` too: stability's step and spike records share a step); each key once."""
    records = collections.defaultdict(list)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        records[tuple((k, record[k]) for k in ("kind", *KEY_FIELDS) if k in record)].append(record)
    duplicated = [k for k, v in records.items() if len(v) > 1]
    assert not duplicated, f"{path.name}: records written twice: {duplicated[:3]}"
    return {k: v[0] for k, v in records.items()}


def test_kill_and_resume_the_stateful_health_probes_keeps_every_record_once_with_equal_values(tmp_path, monkeypatch):
    """StabilityMonitor, GradientNoiseScaleMonitor, CurvatureMonitor and PerSampleGradientMonitor (their windows,
    EMAs, cadences and probe batches in the checkpoint): killed in epoch 2 (3 optimiser steps an epoch, 2
    micro-batches a step) after records of step 6 past the checkpoint of epoch 1 were written, resumed (in this
    process); the training order depends on the epoch only, so the resumed records equal the uninterrupted run's."""
    from lightning_probes.cli import main

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(HEALTH.format(save_dir=tmp_path / "runs", name=name))
        return path

    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(config("reference"))])
    crash = config("crash")
    _fit(crash, tmp_path, kill_at="2:3")  # epoch 2, the second step's second micro-batch: global step 7
    killed = tmp_path / "runs" / "crash" / "version_0"
    assert torch_load_step(killed / "checkpoints" / "last.ckpt") == 6
    assert 6 in {r["step"] for r in map(json.loads, (killed / "probes" / "stability.jsonl").read_text().splitlines())}
    monkeypatch.delenv("LP_PAUSE_AT", raising=False)
    main(["fit", "--config", str(crash), "--ckpt_path", str(killed / "checkpoints" / "last.ckpt")])  # no 2nd import
    reference = tmp_path / "runs" / "reference" / "version_0" / "probes"
    final = tmp_path / "runs" / "crash" / "version_1" / "probes"
    for probe in HEALTH_PROBES:
        expected, got = _records(reference / f"{probe}.jsonl"), _records(final / f"{probe}.jsonl")
        assert len({dict(k).get("step") for k in expected}) >= 3, probe  # records at several steps
        assert got.keys() == expected.keys(), (f"{probe}: missing {sorted(set(expected) - set(got))[:3]}, "
                                               f"extra {sorted(set(got) - set(expected))[:3]}")
        for key, record in expected.items():
            assert got[key].keys() == record.keys(), (probe, key)
            for field, value in record.items():
                other = got[key][field]
                if isinstance(value, float):
                    assert isinstance(other, (int, float)) and not isinstance(other, bool) \
                        and math.isclose(value, other, rel_tol=1e-9), (probe, key, field, value, other)
                else:
                    assert other == value, (probe, key, field, value, other)
