"""Transfer learning arguments of `ImageClassifier`: ``init_from``, ``freeze``, ``reinit``; and a tiny transfer study
(fine-tuned vs not retrained, plus a missing checkpoint) run end to end with ``lightning-probes study``."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch

from lightning_probes.cli import main as cli_main
from lightning_probes.commands.study import study
from lightning_probes.datamodules import DigitsDataModule
from lightning_probes.models import MLP, DropoutNet
from tests.helpers import RandomDataModule, small_mlp, trainer
from tests.studies.conftest import OVERRIDES, write_study

# The small MLP's modules holding weights: fc1 bn1 fc2 bn2 fc3 bn3 fc4.
FROZEN = ["fc1", "bn1", "fc2", "bn2"]
EVERYTHING = ["fc1", "bn1", "fc2", "bn2", "fc3", "bn3", "fc4"]


def _state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _under(state: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if any(k.startswith(f"net.{n}.") for n in names)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A Lightning checkpoint of the small MLP after one epoch (batch-norm statistics away from their init)."""
    root = tmp_path_factory.mktemp("source")
    pl.seed_everything(0)
    run = trainer(root, [], max_epochs=1)
    run.fit(small_mlp(), RandomDataModule())
    path = root / "source.ckpt"
    run.save_checkpoint(path)
    return path


def test_init_from_loads_exactly_the_checkpoint_weights(source):
    state = _state(source)
    model = small_mlp(init_from=str(source))
    own = model.state_dict()
    assert own.keys() == state.keys()
    assert all(torch.equal(own[k], state[k]) for k in state)
    assert model.hparams.init_from == str(source)
    fresh = small_mlp().state_dict()
    assert not torch.equal(fresh["net.fc1.weight"], state["net.fc1.weight"])


def test_freeze_keeps_weights_and_batch_norm_statistics_and_reinit_redraws_the_head(source, tmp_path):
    state = _state(source)
    pl.seed_everything(3)
    model = small_mlp(init_from=str(source), freeze=FROZEN, reinit=["fc4"], weight_decay=0.1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(start["net.fc4.weight"], state["net.fc4.weight"])  # re-initialised ...
    assert torch.equal(start["net.fc3.weight"], state["net.fc3.weight"])  # ... the rest loaded

    modes = []

    class Modes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append((pl_module.net.bn1.training, pl_module.net.fc1.training, pl_module.net.bn3.training))

    run = trainer(tmp_path, [Modes()], max_epochs=2)
    run.fit(model, RandomDataModule())
    optimised = {id(p) for group in run.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for n, p in model.named_parameters() if not n.startswith(tuple(
        f"net.{m}." for m in FROZEN))}
    assert set(modes) == {(False, False, True)}  # frozen modules stay in eval mode, after validation too
    end = model.state_dict()
    frozen = _under(state, FROZEN)
    assert "net.bn1.running_mean" in frozen and "net.bn2.num_batches_tracked" in frozen
    for key, value in frozen.items():  # weights and batch-norm running statistics, bit for bit
        assert torch.equal(end[key], value), key
    for key in ("net.fc3.weight", "net.bn3.running_mean", "net.fc4.weight"):
        assert not torch.equal(end[key], start[key]), key
    assert not any(p.requires_grad for p in model.net.fc1.parameters())


def test_reinit_is_drawn_from_the_seeded_random_state(source):
    def head(seed):
        pl.seed_everything(seed)
        return small_mlp(init_from=str(source), reinit=["fc3", "fc4"]).net.fc4.weight

    assert torch.equal(head(1), head(1))
    assert not torch.equal(head(1), head(2))


def test_everything_frozen_fits_one_epoch_and_checkpoints_the_loaded_weights(source, tmp_path):
    model = small_mlp(init_from=str(source), freeze=EVERYTHING)
    assert model.configure_optimizers() is None
    run = trainer(tmp_path, [pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=5,
                  enable_checkpointing=True)
    run.fit(model, RandomDataModule())
    assert run.current_epoch == 1  # stopped after its first epoch
    saved, state = _state(tmp_path / "last.ckpt"), _state(source)
    assert all(torch.equal(saved[k], state[k]) for k in state)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"freeze": ["fc9"]}, ValueError,
     r"Expected `freeze` to name modules of MLPNet .* but got 'fc9'; valid names: fc1, bn1, fc2, bn2, fc3, bn3, fc4$"),
    ({"reinit": ["relu1"]}, ValueError, r"Expected `reinit` to name modules .* 'relu1'; valid names: fc1, bn1"),
    ({"freeze": "fc1"}, ValueError, r"Expected `freeze` to be a list of module names .* but got 'fc1'"),
    ({"init_from": "missing.ckpt"}, FileNotFoundError,
     r"Expected `init_from` to be the path of a Lightning checkpoint file, but 'missing.ckpt' is not a file"),
])
def test_bad_arguments_give_one_clear_error(kwargs, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        small_mlp(**kwargs)


def test_init_from_of_another_network_or_not_a_checkpoint(source, tmp_path):
    with pytest.raises(ValueError, match=r"Expected `init_from` to hold the weights of this MLP, but .* does not "
                                         r"match: shape mismatch \(checkpoint vs model\): net.fc1.weight \(16, 64\) "
                                         r"vs \(32, 64\)"):
        MLP(hidden=(32, 12, 8), input_size=8, init_from=str(source))
    with pytest.raises(ValueError, match=r"`init_from` to hold the weights of this DropoutNet.*missing: "
                                         r"net.conv1.weight"):
        DropoutNet(init_from=str(source))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"Expected `init_from` to be a Lightning checkpoint with a `state_dict`, "
                                         r"but .* holds keys weight"):
        small_mlp(init_from=str(tmp_path / "plain.pt"))
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"Expected `init_from` to be a Lightning checkpoint, but .* could not be "
                                         r"read"):
        small_mlp(init_from=str(tmp_path / "text.ckpt"))


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--model", "MLP", "--data", "DigitsDataModule", "--model.init_args.init_from", "gone.ckpt",
                  "--trainer.logger", "false"])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [f"error: Expected `init_from` to be the path of a Lightning checkpoint file, but 'gone.ckpt' is "
                   f"not a file (looked for {str(tmp_path / 'gone.ckpt')!r})"]


MLP_FINETUNE = {"class_path": "lightning_probes.models.MLP",
                "init_args": {"freeze": ["fc1", "bn1", "fc2", "bn2", "fc3", "bn3"], "reinit": ["fc4"]}}
MLP_FROZEN = {"class_path": "lightning_probes.models.MLP", "init_args": {"freeze": EVERYTHING}}


def test_transfer_study_fine_tuned_vs_not_retrained(tmp_path, monkeypatch):
    """configs/studies/transfer.yaml in small: digits MLP, a source checkpoint and a missing one x (fine-tuned, not
    retrained), tested; the not-retrained trial tests exactly the source model."""
    monkeypatch.chdir(tmp_path)
    pl.seed_everything(0)
    run = trainer(tmp_path, [], max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    run.fit(MLP(), DigitsDataModule())
    # In a folder: the trial id of a bare file name would be its extension (`init_from=ckpt`) for both.
    run.save_checkpoint(tmp_path / "ckpts" / "source.ckpt")
    reference = trainer(tmp_path, [], limit_test_batches=OVERRIDES["trainer.limit_test_batches"]).test(
        MLP(init_from="ckpts/source.ckpt"), DigitsDataModule(), verbose=False)[0]

    config = write_study(tmp_path / "transfer.yaml", name="transfer",
                         overrides={**OVERRIDES, "data.init_args.swap_train_val": True},
                         grid={"model.init_args.init_from": ["ckpts/source.ckpt", "ckpts/missing.ckpt"],
                               "model": [MLP_FINETUNE, MLP_FROZEN]}, seeds=[1])
    assert study(str(config), output="out", progress=False) == 1  # the missing checkpoint's trials fail
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    settings = {(s["params"]["model.init_args.init_from"], s["params"]["model"]["init_args"].get("reinit") is None): s
                for s in summary["settings"]}
    finetuned, frozen = settings[("ckpts/source.ckpt", False)], settings[("ckpts/source.ckpt", True)]
    for setting in (finetuned, frozen):
        assert setting["n"] == 1 and {"test/acc", "test/loss"} <= set(setting["test"])
    assert frozen["test"]["test/acc"]["mean"] == pytest.approx(reference["test/acc"], abs=1e-6)
    assert frozen["test"]["test/loss"]["mean"] == pytest.approx(reference["test/loss"], rel=1e-5)
    for missing in (settings[("ckpts/missing.ckpt", False)], settings[("ckpts/missing.ckpt", True)]):
        assert missing["n"] == 0 and missing["failed_seeds"] == [1]

    trials = {p.name: p for p in (tmp_path / "out" / "trials").iterdir()}
    table = pd.read_csv(tmp_path / "out" / "trials.csv").set_index("trial_id")
    source = _state(tmp_path / "ckpts" / "source.ckpt")
    for trial_id, trial in trials.items():
        status = json.loads((trial / "status.json").read_text())
        if trial_id.startswith("init_from=ckpts_missing.ckpt"):
            assert status["status"] == "failed"
            assert "Expected `init_from` to be the path of a Lightning checkpoint file, but 'ckpts/missing.ckpt' is " \
                   "not a file" in status["error"]
            assert table.loc[trial_id, "status"] == "failed"
            continue
        assert status["status"] == "finished"
        tuned = _state(trial / "checkpoints" / "last.ckpt")
        frozen_layers = EVERYTHING if "reinit" not in trial_id else EVERYTHING[:-1]
        for key, value in _under(source, frozen_layers).items():
            assert torch.equal(tuned[key], value), (trial_id, key)
        if "reinit" in trial_id:
            assert not torch.equal(tuned["net.fc4.weight"], source["net.fc4.weight"])
            assert table.loc[trial_id, "epochs"] == OVERRIDES["trainer.max_epochs"]
        else:
            assert table.loc[trial_id, "epochs"] == 1  # the fit stopped after one epoch
