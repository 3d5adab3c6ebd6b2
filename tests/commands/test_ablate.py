"""``lightning-probes ablate``: a tiny MLP fitted on the bundled digits, ablated from its fit config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_probes.cli import main as cli_main
from lightning_probes.commands import COMMANDS
from lightning_probes.commands.ablate import main

FIT_CONFIG = """
seed_everything: 3
trainer:
  max_epochs: 2
  limit_train_batches: 2
  limit_val_batches: 1
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args:
        dirpath: {root}/checkpoints
        save_top_k: -1
model:
  class_path: lightning_probes.models.MLP
  init_args:
    hidden: [16, 12, 8]
data:
  class_path: lightning_probes.datamodules.DigitsDataModule
  init_args:
    batch_size: 32
"""
FAST = ["--fractions", "0,0.5", "--random_repeats", "2", "--limit_batches", "2", "--no_progress"]
LAYERS = ["net.fc1", "net.fc2", "net.fc3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A fit with two epoch checkpoints in ``checkpoints/`` and its config in ``fit.yaml``."""
    root = tmp_path_factory.mktemp("fit")
    (root / "fit.yaml").write_text(FIT_CONFIG.format(root=root))
    cli_main(["fit", "--config", str(root / "fit.yaml")])
    assert len(list((root / "checkpoints").glob("epoch=*.ckpt"))) == 2
    return root


def _checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("epoch=*.ckpt"))


def test_ablate_is_a_command():
    assert COMMANDS["ablate"] == "lightning_probes.commands.ablate"


def test_one_checkpoint(run, tmp_path, capsys):
    ckpt = _checkpoints(run)[1]
    out = tmp_path / "out"
    cli_main(["ablate", "--config", str(run / "fit.yaml"), "--ckpt_path", str(ckpt), "--output", str(out), *FAST])
    result = json.loads((out / "ablation.json").read_text())
    assert result["checkpoint"] == str(ckpt) and result["epoch"] == 1
    assert set(result["intact"]) >= {"acc", "loss"}
    assert result["fractions"] == [0.0, 0.5]
    assert result["num_samples"] == 64
    assert list(result["layers"]) == LAYERS
    assert "all_layers" not in result
    for layer in result["layers"].values():
        assert layer["units"] == len(layer["alignment"])
        for order in ("high", "low"):
            assert set(layer[order]) >= {"acc", "loss", "collapse", "acc_deviation", "loss_deviation", "confusion",
                                         "confidence", "thresholded"}
            assert len(layer[order]["acc"]) == 2 and len(layer[order]["collapse"]) == 2
            assert layer[order]["acc"][0] == result["intact"]["acc"]
            assert set(layer[order]["collapse"][1]) == {"entropy", "top_share", "top_class", "histogram"}
        assert set(layer["random"]) >= {"acc_mean", "acc_std", "loss_mean", "loss_std"}
        assert len(layer["random"]["acc"]) == 2  # one row per repeat
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"deviation.png", "collapse.png", "confusion_net.fc1_high.png", "confusion_net.fc3_random.png"} <= figures
    printed = capsys.readouterr().out
    assert "net.fc2" in printed and "random" in printed and str(out / "ablation.json") in printed


def test_a_directory_of_checkpoints_is_compared(run, capsys):
    main(["--config", str(run / "fit.yaml"), "--ckpt_path", str(run / "checkpoints"), "--mode", "all_layers",
          "--rescale", "inverted", "--figure_fractions", "0.5", *FAST])
    out = run / "checkpoints" / "ablation"  # default: inside the directory of checkpoints
    result = json.loads((out / "ablation.json").read_text())
    assert [a["checkpoint"] for a in result["checkpoints"]] == [str(p) for p in _checkpoints(run)]
    for analysis in result["checkpoints"]:
        assert analysis["mode"] == "all_layers" and analysis["rescale"] == "inverted"
        assert set(analysis["all_layers"]) >= {"units", "dropped", "high", "low", "random"}
        assert analysis["all_layers"]["dropped"] == [0, 8 + 6 + 4]
        assert "high" not in analysis["layers"]["net.fc1"]
    comparison = result["comparison"]
    assert comparison["checkpoints"] == [p.stem for p in _checkpoints(run)]
    high = comparison["targets"]["all_layers"]["high"]
    assert len(high["top_class"]) == 2 and len(high["top_class"][0]) == 2
    assert high["top_class"][1][1] == result["checkpoints"][1]["all_layers"]["high"]["collapse"][1]["top_class"]
    assert len(high["agreement"]) == 2 and len(high["overlap"]) == 2
    assert (out / "figures" / "collapse_checkpoints_all_layers.png").stat().st_size > 0
    for ckpt in _checkpoints(run):
        assert (out / "figures" / ckpt.stem / "deviation.png").exists()
    assert capsys.readouterr().out.count("accuracy, epoch=") == 2


def test_the_config_saved_by_the_run_works_too(run, tmp_path):
    saved = run / "config.yaml"  # written by LightningCLI, with `ckpt_path: null` and every default
    assert "ckpt_path" in saved.read_text()
    main(["--config", str(saved), "--ckpt_path", str(_checkpoints(run)[0]), "--output", str(tmp_path), "--no_figures",
          *FAST])
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert list(result["layers"]) == LAYERS
    assert not (tmp_path / "figures").exists()


@pytest.mark.parametrize(("args", "names"), [
    (["--ckpt_path", "{run}/missing.ckpt"], "ckpt_path"),
    (["--ckpt_path", "{run}/fit.yaml/"], "ckpt_path"),
    (["--fractions", "0,1"], "fractions"),
    (["--fractions", "0,-0.2"], "fractions"),
    (["--fractions", "0,half"], "fractions"),
    (["--random_repeats", "0"], "random_repeats"),
    (["--random_repeats", "many"], "random_repeats"),
    (["--mode", "every_layer"], "mode"),
    (["--rescale", "doubled"], "rescale"),
    (["--figure_fractions", "0.75"], "figure_fractions"),
    (["--config", "{run}/nothing.yaml"], "config"),
    (["--unknown", "1"], "unknown"),
], ids=lambda v: v if isinstance(v, str) else "_".join(v)[:40])
def test_bad_arguments_give_one_error_line(run, tmp_path, capsys, args, names):
    base = {"--config": str(run / "fit.yaml"), "--ckpt_path": str(_checkpoints(run)[0]),
            "--output": str(tmp_path / "o")}
    extra = [a.format(run=run) for a in args]
    for flag in extra[::2]:
        base.pop(flag, None)
    argv = [item for pair in base.items() for item in pair] + extra
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and names in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_of_another_model_is_rejected(run, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text((run / "fit.yaml").read_text().replace("hidden: [16, 12, 8]", "hidden: [16, 12, 9]"))
    with pytest.raises(SystemExit) as info:
        main(["--config", str(other), "--ckpt_path", str(_checkpoints(run)[0]), "--output", str(tmp_path / "o"),
              *FAST])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ckpt_path" in err[0] and "net.fc3.weight" in err[0]
    assert not (tmp_path / "o").exists()
