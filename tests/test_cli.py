"""The `lightning` CLI: every config fits with fast_dev_run, and bad input exits with one clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pytorch_lightning import Callback

from lightning_probes.cli import main
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.models import MLP

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_every_config_is_tested():
    assert {c.stem for c in CONFIGS} >= {"quickstart", "mnist_mlp", "mnist_lenet5", "cifar10_baseline",
                                         "cifar10_dropout", "cifar10_batchnorm"}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_fast_dev_run(config, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(config), "--trainer.fast_dev_run", "2", "--trainer.default_root_dir", str(tmp_path),
            "--data.num_workers", "0"]
    if config.stem != "quickstart":
        args += ["--data.data_dir", str(tiny_data)]
    main(args)
    probes = tmp_path / "probes"
    assert (probes / "gradient_stats.jsonl").stat().st_size > 0


def test_quickstart_writes_tensorboard_metrics(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS[0].parent / "quickstart.yaml"), "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2"])
    run = tmp_path / "runs" / "quickstart" / "version_0"
    events = EventAccumulator(str(run)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/f1"} <= tags
    assert any(t.startswith("gradient_stats/grad_norm/") for t in tags)
    assert (run / "probes" / "gradient_stats.jsonl").exists()


def test_model_and_data_by_class_name(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--model", "LeNet5", "--data", "MNISTDataModule", "--data.data_dir", str(tiny_data),
          "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path)])
    main(["test", "--model", "LeNet5", "--data", "MNISTDataModule", "--data.data_dir", str(tiny_data),
          "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path)])


def _error(capsys, args) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code not in (0, None)
    return capsys.readouterr().err


def test_unknown_key(capsys):
    err = _error(capsys, ["fit", "--config", str(CONFIGS[0].parent / "quickstart.yaml"), "--model.init_args.lrr", "1"])
    assert "lrr" in err


def test_wrong_type(capsys):
    err = _error(capsys, ["fit", "--model", "MLP", "--model.lr", "fast"])
    assert "lr" in err and "fast" in err


def test_negative_lr(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _error(capsys, ["fit", "--model", "MLP", "--model.lr", "-0.1", "--data", "DigitsDataModule"])
    assert "`lr`" in err and "-0.1" in err
    assert "Traceback" not in err


def test_missing_data(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _error(capsys, ["fit", "--model", "LeNet5", "--data", "MNISTDataModule", "--data.data_dir",
                          str(tmp_path / "nowhere"), "--trainer.fast_dev_run", "1"])
    assert "nowhere" in err and "train-images-idx3-ubyte" in err
    assert err.count("\n") == 1


def test_failed_download_is_one_message(capsys, tmp_path, monkeypatch):
    import lightning_probes.datamodules.mnist as mnist

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(mnist, "MNIST", offline)
    monkeypatch.chdir(tmp_path)
    err = _error(capsys, ["fit", "--model", "LeNet5", "--data", "MNISTDataModule", "--data.download", "true",
                          "--data.data_dir", str(tmp_path), "--trainer.fast_dev_run", "1"])
    assert "Could not download MNIST" in err and "Traceback" not in err


def test_bad_config_value_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _error(capsys, ["fit", "--config", str(CONFIGS[0].parent / "quickstart.yaml"),
                          "--data.init_args.batch_size", "0"])
    assert err == "error: Expected `batch_size` to be a positive integer, but got 0\n"


class MisconfiguredProbe(Callback):
    """Stands for a probe that finds, in ``setup``, that it does not fit the Trainer."""

    def setup(self, trainer, pl_module, stage):
        raise ProbeConfigurationError("MisconfiguredProbe needs a logger")


def test_probe_configuration_error_in_setup_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _error(capsys, ["fit", "--model", "MLP", "--data", "DigitsDataModule", "--trainer.fast_dev_run", "1",
                          "--trainer.callbacks", "tests.test_cli.MisconfiguredProbe"])
    assert err == "error: MisconfiguredProbe needs a logger\n"


class BrokenMLP(MLP):
    """A user's model with a bug in ``training_step``."""

    def training_step(self, batch, batch_idx):
        raise ValueError("bug in the user's training_step")


def test_error_in_training_step_propagates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="bug in the user's training_step"):
        main(["fit", "--model", "tests.test_cli.BrokenMLP", "--data", "DigitsDataModule",
              "--trainer.fast_dev_run", "1"])


def test_error_in_training_step_keeps_its_traceback(tmp_path):
    (tmp_path / "user_model.py").write_text(
        "from lightning_probes.models import MLP\n\n\n"
        "class Broken(MLP):\n"
        "    def training_step(self, batch, batch_idx):\n"
        "        raise ValueError('bug in the user model')\n")
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_PROBES_DEBUG"}
    out = subprocess.run([sys.executable, "-m", "lightning_probes.cli", "fit", "--model", "user_model.Broken",
                          "--data", "DigitsDataModule", "--trainer.fast_dev_run", "1",
                          "--trainer.enable_progress_bar", "false"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr
    assert 'user_model.py", line 6, in training_step' in out.stderr
    assert "ValueError: bug in the user model" in out.stderr
    assert "error: " not in out.stderr


def test_help_names_the_project_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Project commands: study, ablate" in out and "{fit,validate,test,predict}" in out
