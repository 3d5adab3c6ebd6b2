"""Real MLflow and Weights & Biases: every probe scalar and figure reaches each logger's own storage.

The loggers are read back the way a user would find the run: MLflow through its client API on a local sqlite
store, W&B from its offline run directory (``WANDB_MODE=offline``: local files only). The expected scalars and
images are those the probes sent to a recording logger attached beside the real one. Skipped when the ``loggers``
extra is not installed; ``tests/callbacks/test_base.py`` covers the same calls with fake loggers.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import time

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers.logger import Logger, rank_zero_experiment

import lightning_probes as lp
from lightning_probes.cli import main
from lightning_probes.run_dir import run_directory
from tests.conftest import CaptureLogger
from tests.helpers import RandomDataModule, small_mlp

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


class Recorder(Logger):
    """Keeps every metric and every image a probe sends, with its step (an ``add_image`` logger, like TensorBoard)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.images: set[tuple[str, int]] = set()

    name = "recorder"
    version = 0

    @property
    @rank_zero_experiment
    def experiment(self):
        return self

    def add_image(self, tag, image, global_step=None, dataformats="HWC") -> None:
        self.images.add((tag, global_step))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))


def every_probe() -> list[lp.callbacks.base.ProbeCallback]:
    """All eight probes, each drawing its figures every epoch."""
    return [lp.GradientStatsMonitor(every_n_steps=2), lp.GradientDynamicsMonitor(every_n_steps=2),
            lp.ConfidenceMonitor(plot_every_n_epochs=1),
            lp.NoiseRobustnessMonitor(num_samples=8, num_draws=2, plot_every_n_epochs=1),
            lp.LayerCorrelationMonitor(num_samples=16, plot_every_n_epochs=1),
            lp.ActivationStatsMonitor(num_samples=16, plot_every_n_epochs=1),
            lp.AugmentationInvarianceMonitor(num_images=2, num_views=4, plot_every_n_epochs=1),
            lp.AlignmentMonitor(num_samples=16, plot_every_n_epochs=1)]


def fit(tmp_path, logger) -> tuple[Recorder, list]:
    recorder, probes = Recorder(), every_probe()
    trainer = pl.Trainer(max_epochs=2, default_root_dir=str(tmp_path), logger=[logger, recorder], callbacks=probes,
                         log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(small_mlp(), RandomDataModule())
    return recorder, probes


def check_recorded(recorder: Recorder, probes: list) -> None:
    """The reference itself holds scalars and images of every probe (else the comparisons prove little)."""
    for probe in probes:
        assert any(k.startswith(f"{probe.name}/") for k in recorder.metrics), probe.name
        assert any(tag.startswith(f"{probe.name}/") for tag, _ in recorder.images), probe.name


def close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return len(a) == len(b) and all(sa == sb and math.isclose(va, vb, rel_tol=1e-6, abs_tol=1e-9)
                                    for (sa, va), (sb, vb) in zip(sorted(a), sorted(b)))


def test_run_directory_without_a_logger_directory(tmp_path):
    trainer = pl.Trainer(default_root_dir=str(tmp_path), logger=CaptureLogger())
    assert trainer.log_dir is None
    assert run_directory(trainer) == os.path.join(str(tmp_path), "capture", "version_0")
    assert run_directory(pl.Trainer(default_root_dir=str(tmp_path), logger=False)) == str(tmp_path)
    assert run_directory(pl.Trainer(default_root_dir=str(tmp_path), fast_dev_run=1)) == str(tmp_path)


def test_cli_saves_its_config_when_the_logger_has_no_directory(tmp_path, monkeypatch):
    """The seen bug: LightningCLI's SaveConfigCallback stopped with a bare AssertionError (`trainer.log_dir` None)."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", os.path.join(CONFIGS, "quickstart.yaml"),
          "--trainer.logger", "tests.conftest.CaptureLogger", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"])
    run = tmp_path / "capture" / "version_0"
    assert "tests.conftest.CaptureLogger" in (run / "config.yaml").read_text()
    assert (run / "probes" / "gradient_stats.jsonl").stat().st_size > 0
    assert (run / "checkpoints" / "last.ckpt").exists()  # beside Lightning's checkpoints for that logger


# -- MLflow ----------------------------------------------------------------------------------------------------------
def test_every_probe_reaches_mlflow(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="probes", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"))
    recorder, probes = fit(tmp_path, logger)
    check_recorded(recorder, probes)
    # A database store has no directory: the probes write beside Lightning's checkpoints for that run.
    run_dir = tmp_path / logger.experiment_id / logger.run_id
    assert all((run_dir / "probes" / f"{p.name}.jsonl").stat().st_size > 0 for p in probes)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(logger.run_id)
    assert set(run.data.metrics) == set(recorder.metrics)
    for key, expected in recorder.metrics.items():
        history = [(m.step, m.value) for m in client.get_metric_history(logger.run_id, key)]
        assert close(history, expected), key

    def files(path=None):
        for info in client.list_artifacts(logger.run_id, path):
            yield from files(info.path) if info.is_dir else [info.path]

    artifacts = set(files())
    assert artifacts == {f"{tag}/step_{step:08d}.png" for tag, step in recorder.images}
    local = client.download_artifacts(logger.run_id, sorted(artifacts)[0], str(tmp_path / "download"))
    with open(local, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# -- Weights & Biases (offline) ---------------------------------------------------------------------------------------
def wandb_records(path: str) -> list:
    """The protobuf records of an offline run's ``run-<id>.wandb`` file (W&B's LevelDB-style log: a 7-byte header
    ``:W&B``, 0xBEE1, version 0; 32 KiB blocks of chunks, each ``crc32, length, type`` then the bytes; types 1 full,
    2 first, 3 middle, 4 last). The W&B package has no Python reader of its own any more (its core is in Go)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_every_probe_reaches_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="probes", save_dir=str(tmp_path), offline=True)
    try:
        recorder, probes = fit(tmp_path, logger)
    finally:
        wandb.finish()
    check_recorded(recorder, probes)

    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    (log,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    # W&B's core process may still be appending after `wandb.finish()` returns (seen on a loaded machine: the last
    # rows missing): read once the run's `exit` record, which it writes after every row, is in the file.
    deadline = time.monotonic() + 120
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(log)):
        assert time.monotonic() < deadline, f"{log} has no exit record 120 s after wandb.finish()"
        time.sleep(0.5)
    scalars: dict[str, list[tuple[int, float]]] = {}
    images: dict[tuple[str, int], dict] = {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:  # a media value comes as one item per field: [key, "_type"], ...
            path = list(item.nested_key) or [item.key]
            if len(path) == 1:
                row[path[0]] = json.loads(item.value_json)
            else:
                row.setdefault(path[0], {})["/".join(path[1:])] = json.loads(item.value_json)
        step = row.get("trainer/global_step")
        for key, value in row.items():
            if isinstance(value, dict) and value.get("_type", "").startswith("images"):
                images[(key, step)] = value
            elif key in recorder.metrics:
                scalars.setdefault(key, []).append((step, value))
    assert set(scalars) == set(recorder.metrics)
    for key, expected in recorder.metrics.items():
        assert close(scalars[key], expected), key
    assert set(images) == recorder.images
    for value in images.values():
        for name in value["filenames"]:
            with open(os.path.join(run_dir, "files", name), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
