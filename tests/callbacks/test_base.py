"""What every probe shares: names, files, resume bookkeeping, loggers of every kind, settings and layout."""

from __future__ import annotations

import json
import os
import stat

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.logger import Logger, rank_zero_experiment

import lightning_probes as lp
from lightning_probes.io import JsonlWriter, atomic_write_json, read_jsonl
from tests.helpers import RandomDataModule, read, small_mlp, trainer


class WandbLike(Logger):
    """The part of ``WandbLogger``'s API the probes use: ``log_image(key, images, step)``."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.metrics = [], []

    name = "wandb_like"
    version = 0

    @property
    @rank_zero_experiment
    def experiment(self):
        return object()  # a W&B run has no add_image

    def log_image(self, key, images, step=None, **kwargs) -> None:
        assert images[0].ndim == 3 and images[0].shape[2] == 3
        self.images.append((key, step))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.hparams = dict(params)

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append(metrics)


class MlflowClientLike:
    def __init__(self) -> None:
        self.figures = []

    def log_figure(self, run_id, figure, artifact_file) -> None:
        assert hasattr(figure, "savefig")
        self.figures.append((run_id, artifact_file))


class MlflowLike(Logger):
    """The part of ``MLFlowLogger``'s API the probes use: ``experiment.log_figure(run_id, figure, file)``."""

    def __init__(self) -> None:
        super().__init__()
        self.client = MlflowClientLike()
        self.run_id = "run-123"

    name = "mlflow_like"
    version = 0

    @property
    @rank_zero_experiment
    def experiment(self):
        return self.client

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        pass


def _fit(tmp_path, callbacks, **kwargs):
    t = trainer(tmp_path, callbacks, **kwargs)
    t.fit(small_mlp(), RandomDataModule())
    return t


def test_bad_name_is_rejected():
    for bad in ("", "a/b", ".hidden", 3):
        with pytest.raises(ValueError, match="Expected `name`"):
            lp.GradientStatsMonitor(name=bad)


def test_two_instances_with_distinct_names_keep_apart(tmp_path):
    a = lp.NoiseRobustnessMonitor(num_samples=8, num_draws=2, sigma=0.1, name="noise_small", output_dir=tmp_path)
    b = lp.NoiseRobustnessMonitor(num_samples=8, num_draws=2, sigma=2.0, name="noise_large", output_dir=tmp_path)
    assert a.state_key != b.state_key
    _fit(tmp_path, [a, b], max_epochs=1)
    small, large = read(tmp_path / "noise_small.jsonl"), read(tmp_path / "noise_large.jsonl")
    assert [r["sigma"] for r in small] == [0.1] and [r["sigma"] for r in large] == [2.0]
    assert (tmp_path / "noise_small").is_dir() and (tmp_path / "noise_large").is_dir()


def test_two_instances_with_one_name_fail_before_training(tmp_path):
    probes = [lp.GradientStatsMonitor(every_n_steps=1), lp.GradientStatsMonitor(every_n_steps=2)]
    with pytest.raises(Exception, match="state_key|distinct `name`"):
        _fit(tmp_path, probes, max_epochs=1)


def test_state_dict_keeps_the_count_between_restore_and_next_write(tmp_path):
    """The seen bug: after `load_state_dict` a probe reported 0 records until it next wrote."""
    out = tmp_path / "probes"
    probe = lp.GradientStatsMonitor(every_n_steps=1, output_dir=str(out))
    _fit(tmp_path, [probe], max_epochs=1)
    written = probe.state_dict()["records_written"]
    assert written == len(read(out / "gradient_stats.jsonl")) > 0
    # A new probe restored from that state, set up by a Trainer, reports the same count before any write.
    restored = lp.GradientStatsMonitor(every_n_steps=1, output_dir=str(out))
    t = trainer(tmp_path, [restored], max_epochs=1)
    restored.setup(t, small_mlp(), "fit")
    restored.load_state_dict({**probe.state_dict(), "records_written": written - 3})
    assert restored.state_dict()["records_written"] == written - 3
    assert len(read(out / "gradient_stats.jsonl")) == written - 3  # cut back at once, not at the next write


def test_restore_copies_history_into_a_new_directory(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    probe = lp.NoiseRobustnessMonitor(num_samples=8, num_draws=2, output_dir=str(old))
    _fit(tmp_path, [probe], max_epochs=2)
    state = probe.state_dict()
    assert state["records_written"] == 2 and state["output_dir"] == str(old)
    resumed = lp.NoiseRobustnessMonitor(num_samples=8, num_draws=2, output_dir=str(new))
    t = trainer(tmp_path, [resumed])
    resumed.setup(t, small_mlp(), "fit")
    resumed.load_state_dict({**state, "records_written": 1})
    assert read(new / "noise_robustness.jsonl") == read(old / "noise_robustness.jsonl")[:1]
    assert sorted(os.listdir(new / "noise_robustness")) == sorted(os.listdir(old / "noise_robustness"))
    assert len(read(old / "noise_robustness.jsonl")) == 2  # the old run's files are left as they were


def test_writer_restore_skips_a_torn_line_and_appends(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3')  # a crash tore the last line
    writer = JsonlWriter(str(path))
    assert writer.restore(5) == 2
    writer.write([{"a": 4}])
    writer.close()
    assert [r["a"] for r in read_jsonl(str(path))] == [1, 2, 4]


def test_atomic_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(str(tmp_path / "s.json"), {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s.json").st_mode) == 0o644
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}


def test_figures_and_scalars_reach_every_kind_of_logger(tmp_path):
    wandb, mlflow = WandbLike(), MlflowLike()
    csv = CSVLogger(str(tmp_path), name="csv")
    probe = lp.GradientStatsMonitor(every_n_steps=1)
    _fit(tmp_path, [probe], max_epochs=1, logger=[csv, wandb, mlflow], log_every_n_steps=1)
    assert ("gradient_stats/gradient_flow", probe._optimizer_steps[0]) in wandb.images
    assert mlflow.client.figures and mlflow.client.figures[0][0] == "run-123"
    assert mlflow.client.figures[0][1].startswith("gradient_stats/gradient_flow/")
    metrics = pd.read_csv(os.path.join(csv.log_dir, "metrics.csv"))
    assert "gradient_stats/grad_norm/__total__" in metrics.columns
    assert metrics["gradient_stats/grad_norm/__total__"].notna().sum() == 6  # 96 samples / 16: every step
    assert wandb.hparams["probes/gradient_stats/every_n_steps"] == 1


def test_tensorboard_gets_a_custom_scalars_layout_and_the_settings(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    tb = TensorBoardLogger(str(tmp_path), name="tb")
    probes = [lp.GradientStatsMonitor(every_n_steps=1), lp.ActivationStatsMonitor(num_samples=16)]
    _fit(tmp_path, probes, max_epochs=1, logger=tb)
    events = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0}).Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    categories = {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}
    assert "gradient_stats" in categories
    assert categories["gradient_stats"]["grad_norm"] == ["^gradient_stats/grad_norm/"]
    hparams = tb.hparams
    assert hparams["probes/gradient_stats/every_n_steps"] == 1
    assert hparams["probes/activation_stats/num_samples"] == 16


def test_read_probes_gives_one_tidy_table(tmp_path):
    out = tmp_path / "run" / "probes"
    probes = [lp.GradientStatsMonitor(every_n_steps=2, output_dir=str(out)),
              lp.ConfidenceMonitor(output_dir=str(out))]
    _fit(tmp_path, probes, max_epochs=2)
    table = lp.read_probes(tmp_path / "run")
    assert set(table["probe"]) == {"gradient_stats", "confidence"}
    grads = lp.read_probes(out, "gradient_stats")
    records = read(out / "gradient_stats.jsonl")
    assert len(grads) == len(records)
    assert grads["grad_norm"].tolist() == pytest.approx([r["grad_norm"] for r in records])
    confidence = lp.read_probes(out, "confidence")
    assert "reliability.count" in confidence.columns  # nested fields flattened
    with pytest.raises(ValueError, match="Expected `probe` to be one of"):
        lp.read_probes(out, "nope")
    with pytest.raises(FileNotFoundError, match="run_dir"):
        lp.read_probes(tmp_path / "empty")


def test_fit_then_test_appends_to_one_history(tmp_path):
    out = tmp_path / "probes"
    probe = lp.ConfidenceMonitor(output_dir=str(out))
    t = _fit(tmp_path, [probe], max_epochs=1)
    t.test(t.lightning_module, dataloaders=RandomDataModule().val_dataloader())
    stages = [r["stage"] for r in read(out / "confidence.jsonl")]
    assert stages == ["val", "test"]


def test_headline_metrics_can_be_monitored(tmp_path):
    probes = [lp.GradientStatsMonitor(every_n_steps=1), lp.ConfidenceMonitor(),
              lp.NoiseRobustnessMonitor(num_samples=8, num_draws=2)]
    stop = pl.callbacks.EarlyStopping(monitor="confidence/val/ece", mode="min", patience=10)
    t = _fit(tmp_path, [*probes, stop], max_epochs=2)
    for key in ("confidence/val/ece", "gradient_stats/nonfinite_epoch", "noise_robustness/stability_ratio_mean"):
        assert key in t.callback_metrics and torch.isfinite(t.callback_metrics[key])
