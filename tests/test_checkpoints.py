"""Checkpoints are read safely: ``torch.load(weights_only=True)``; one holding pickled objects is refused with a
message naming ``--trust_checkpoints`` unless trusted (`read_checkpoint`, `module_from_checkpoint`, ``ablate``,
``zoo-dataset``)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from lightning_probes.io import import_class, module_from_checkpoint, read_checkpoint
from lightning_probes.models import MLP


class Payload:
    """Any object of a class: only full unpickling (which can run code) rebuilds it."""

    def __init__(self) -> None:
        self.value = 3


def _checkpoint(tmp_path: Path, extra: object = None, **hparams) -> Path:
    model = MLP(hidden=(8, 6, 4), input_size=8, lr=0.2)
    checkpoint = {"epoch": 1, "global_step": 7, "state_dict": model.state_dict(),
                  "hyper_parameters": {"_class_path": "lightning_probes.models.MLP", "hidden": [8, 6, 4],
                                       "input_size": 8, "lr": 0.2, "_instantiator": "x", **hparams}}
    if extra is not None:
        checkpoint["extra"] = extra
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint, path)
    return path


def test_plain_checkpoints_load_without_trust(tmp_path):
    path = _checkpoint(tmp_path, extra=collections.OrderedDict(a=torch.ones(2)))
    assert read_checkpoint(str(path), "ckpt_path")["global_step"] == 7
    model = module_from_checkpoint(str(path))
    assert isinstance(model, MLP) and not model.training and model.hparams.lr == 0.2
    assert model.loaded_checkpoint == {"epoch": 1, "global_step": 7}
    original = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


def test_pickled_objects_are_refused_unless_trusted(tmp_path):
    path = _checkpoint(tmp_path, extra=Payload())
    with pytest.raises(ValueError, match=r"holds pickled objects \(Unsupported global: .*Payload.*--trust_checkpoints"):
        read_checkpoint(str(path), "ckpt_path")
    with pytest.raises(ValueError, match="--trust_checkpoints"):
        module_from_checkpoint(str(path))
    assert read_checkpoint(str(path), "ckpt_path", trust=True)["extra"].value == 3
    assert isinstance(module_from_checkpoint(str(path), trust=True), MLP)


def test_module_from_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not a LightningModule|is not one"):
        module_from_checkpoint(str(_checkpoint(tmp_path)), class_path="collections.OrderedDict")
    with pytest.raises(ValueError, match="importable class"):
        module_from_checkpoint(str(_checkpoint(tmp_path)), class_path="no_such_module.Net")
    with pytest.raises(ValueError, match="hyper-parameters and weights"):
        module_from_checkpoint(str(_checkpoint(tmp_path, hidden=[8, 6, 5])))
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, plain)
    with pytest.raises(ValueError, match="_class_path"):
        module_from_checkpoint(str(plain))
    assert import_class("lightning_probes.models.MLP") is MLP


def test_ablate_refuses_and_trusts(tmp_path, capsys):
    from lightning_probes.commands.ablate import main
    from tests.commands.test_ablate import FIT_CONFIG

    root = tmp_path / "fit"
    root.mkdir()
    (root / "fit.yaml").write_text(FIT_CONFIG.format(root=root).replace("max_epochs: 2", "max_epochs: 1"))
    from lightning_probes.cli import main as cli_main

    cli_main(["fit", "--config", str(root / "fit.yaml")])
    checkpoint = next((root / "checkpoints").glob("*.ckpt"))
    loaded = torch.load(checkpoint, weights_only=True)
    loaded["extra"] = Payload()
    torch.save(loaded, checkpoint)
    args = ["--config", str(root / "fit.yaml"), "--ckpt_path", str(checkpoint), "--fractions", "0,0.5",
            "--random_repeats", "1", "--limit_batches", "1", "--no_progress", "--no_figures", "--output",
            str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "--trust_checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    main([*args, "--trust_checkpoints"])
    assert (tmp_path / "out" / "ablation.json").is_file()


def test_zoo_models_are_loaded_safely(tmp_path):
    from lightning_probes.studies.zoo import ZooModel, load_model

    path = _checkpoint(tmp_path, extra=Payload())
    zoo_model = ZooModel("t", str(tmp_path), str(path), {"model": {"class_path": "lightning_probes.models.MLP"}}, {})
    with pytest.raises(ValueError, match="--trust_checkpoints"):
        load_model(zoo_model)
    assert isinstance(load_model(zoo_model, trust=True), MLP)
