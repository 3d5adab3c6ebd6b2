"""`lightning_probes.build.build_from_config`: the model and DataModule of a fit config, as `lightning fit` builds
them, with dotted overrides; nothing trained, nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_probes.build import build_from_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def test_builds_the_config_classes_with_overrides(tmp_path, monkeypatch):
    from datamodules import DigitsDataModule
    from models import MLP

    monkeypatch.chdir(tmp_path)
    model, datamodule = build_from_config(str(CONFIG), {"model.init_args.lr": 0.01,
                                                        "data.init_args.data_dir": "elsewhere"})
    assert type(model) is MLP and type(datamodule) is DigitsDataModule
    assert model.hparams.lr == 0.01 and datamodule.data_dir == "elsewhere"
    plain, _ = build_from_config(str(CONFIG))
    assert plain.hparams.lr == 0.05  # the config's own value
    assert os.listdir(tmp_path) == []  # nothing written where it ran


def test_an_unknown_key_is_refused_as_lightning_fit_refuses_it(capsys):
    with pytest.raises(SystemExit):
        build_from_config(str(CONFIG), {"model.init_args.no_such_key": 1})
    assert "no_such_key" in capsys.readouterr().err
