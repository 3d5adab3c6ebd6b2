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


# -- every refusal of the weights-only unpickler names --trust_checkpoints (torch words them differently) ---------
class _SystemCall:
    """Unpickling it calls ``os.system``: a checkpoint must never run it unless trusted."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch '{self.marker}'",)


class _StateDict(collections.OrderedDict):
    """A ``collections.OrderedDict`` subclass: the weights-only unpickler rebuilds only the plain class."""


def _payload(kind: str, marker: Path, monkeypatch) -> object:
    if kind == "os.system":
        return _SystemCall(marker)
    if kind == "__main__ class":
        import sys

        main_class = type("LightningProbesTestThing", (), {"__module__": "__main__"})
        monkeypatch.setattr(sys.modules["__main__"], "LightningProbesTestThing", main_class, raising=False)
        return main_class()
    return _StateDict(a=torch.ones(2))


PAYLOADS = ["os.system", "__main__ class", "OrderedDict subclass"]


def test_the_os_system_payload_runs_when_unpickled(tmp_path):
    """The marker check below means something: plain unpickling of the payload does create the file."""
    import pickle

    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_SystemCall(marker)))
    assert marker.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
def test_every_refusal_names_trust_checkpoints(kind, tmp_path, monkeypatch, capsys):
    from lightning_probes.analysis.analyzer import prepare
    from lightning_probes.commands.ablate import main as ablate_main
    from lightning_probes.studies.zoo import ZooModel, load_model
    from tests.commands.test_ablate import FIT_CONFIG

    marker = tmp_path / "ran"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    path = _checkpoint(run / "checkpoints", extra=_payload(kind, marker, monkeypatch))
    path = path.rename(run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=r"holds pickled objects \(.+\).*--trust_checkpoints"):
        read_checkpoint(str(path), "ckpt_path")
    with pytest.raises(ValueError, match="--trust_checkpoints"):
        module_from_checkpoint(str(path))
    with pytest.raises(ValueError, match="--trust_checkpoints"):  # analyze reads every checkpoint first
        prepare([str(run)], output=str(tmp_path / "analysis"))
    with pytest.raises(ValueError, match="--trust_checkpoints"):  # zoo-dataset's model loading
        load_model(ZooModel("t", str(run), str(path), {"model": {"class_path": "lightning_probes.models.MLP"}}, {}))
    with pytest.raises(ValueError, match=r"holds pickled objects.*init_from` never unpickles.*--trust_checkpoints"):
        MLP(hidden=(8, 6, 4), input_size=8, init_from=str(path))
    (tmp_path / "fit.yaml").write_text(FIT_CONFIG.format(root=tmp_path / "fit"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        ablate_main(["--config", str(tmp_path / "fit.yaml"), "--ckpt_path", str(path), "--no_progress",
                     "--output", str(tmp_path / "ablation")])
    assert exit_info.value.code == 2 and "--trust_checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "analysis").exists() and not (tmp_path / "ablation").exists()
    assert not marker.exists()  # nothing was unpickled


def test_a_file_that_is_no_checkpoint_gives_one_error_naming_it(tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(_checkpoint(tmp_path).read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.ckpt' could not be read with torch.load"):
        read_checkpoint(str(truncated), "ckpt_path")
    for n, text in enumerate(["not a checkpoint\n" * 5, "hello, this is not a checkpoint\n" * 5]):
        path = tmp_path / f"notes{n}.ckpt"  # torch's weights-only unpickler refuses one, the other is a KeyError
        path.write_text(text)
        with pytest.raises(ValueError, match=f"`ckpt_path`.*notes{n}.ckpt"):
            read_checkpoint(str(path), "ckpt_path")
