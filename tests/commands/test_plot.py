"""``lightning-probes plot``: a tiny fit without figures, redrawn from its files, against the same fit with them."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from lightning_probes.cli import main as cli_main
from lightning_probes.commands import COMMANDS
from lightning_probes.commands.plot import main, prepare
from lightning_probes.io import read_jsonl

FIT_CONFIG = """
seed_everything: 3
trainer:
  max_epochs: 2
  limit_train_batches: 2
  limit_val_batches: 2
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_probes.GradientStatsMonitor
      init_args: {{every_n_steps: 1}}
    - class_path: lightning_probes.GradientDynamicsMonitor
      init_args: {{every_n_steps: 1}}
    - class_path: lightning_probes.ConfidenceMonitor
      init_args: {{plot_every_n_epochs: {every}}}
    - class_path: lightning_probes.NoiseRobustnessMonitor
      init_args: {{num_samples: 20, num_draws: 3, plot_every_n_epochs: {every}}}
    - class_path: lightning_probes.LayerCorrelationMonitor
      init_args: {{num_samples: 32, plot_every_n_epochs: {every}}}
    - class_path: lightning_probes.ActivationStatsMonitor
      init_args: {{num_samples: 32, plot_every_n_epochs: {every}}}
    - class_path: lightning_probes.AugmentationInvarianceMonitor
      init_args: {{num_images: 2, num_views: 4, plot_every_n_epochs: {every}}}
    - class_path: lightning_probes.AlignmentMonitor
      init_args: {{num_samples: 32, plot_every_n_epochs: {every}}}
model:
  class_path: lightning_probes.models.MLP
  init_args:
    hidden: [16, 12, 8]
data:
  class_path: lightning_probes.datamodules.DigitsDataModule
  init_args:
    batch_size: 32
"""
MY_PROBES = ("confidence", "noise_robustness", "layer_correlation", "activation_stats", "augmentation_invariance",
             "alignment")


def _fit(root: Path, every: int) -> Path:
    root.mkdir()
    (root / "fit.yaml").write_text(FIT_CONFIG.format(root=root, every=every))
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli_main(["fit", "--config", str(root / "fit.yaml")])
    return root / "probes"


def _pngs(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.glob("*/*.png")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """The probes directories of the same fit with figures every epoch and with none during training."""
    root = tmp_path_factory.mktemp("plot")
    return _fit(root / "on", 1), _fit(root / "off", 0)


def test_plot_is_a_command():
    assert COMMANDS["plot"] == "lightning_probes.commands.plot"


def test_a_run_without_figures_keeps_their_data_and_plot_draws_the_same_files(runs, tmp_path):
    on, off = runs
    drawn_on = _pngs(on)
    assert {p.split("/")[0] for p in drawn_on} >= set(MY_PROBES)
    assert not any(p.split("/")[0] in MY_PROBES for p in _pngs(off))  # plot_every_n_epochs: 0 drew nothing
    for name in MY_PROBES:
        assert (off / name / "settings.json").is_file() and (off / f"{name}.jsonl").stat().st_size > 0
    main([str(off.parent), "--output", str(tmp_path / "out"), "--no_progress"])
    redrawn = _pngs(tmp_path / "out")
    assert redrawn == drawn_on  # every figure, the gradient probes' sign maps included
    for name in redrawn:
        with Image.open(tmp_path / "out" / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    main([str(off.parent), "--no_progress"])  # default output: the run's own probes directory
    assert _pngs(off) == drawn_on


def test_redrawn_figures_show_the_recorded_numbers(runs):
    _, off = runs
    prepared = prepare(str(off), probes="layer_correlation,activation_stats,confidence,noise_robustness")
    figures = {f"{name}/{filename}": draw for name, filename, draw in prepared.figures}

    records = read_jsonl(off / "layer_correlation.jsonl")
    last = [r for r in records if r["epoch"] == records[-1]["epoch"]]
    layers = list(dict.fromkeys(r["layer_a"] for r in last))
    shown = figures["layer_correlation/cka.png"]().axes[0].images[0].get_array()
    for r in last:
        i, j = layers.index(r["layer_a"]), layers.index(r["layer_b"])
        assert shown[i, j] == pytest.approx(r["cka"]) and shown[j, i] == pytest.approx(r["cka"])
    with np.load(off / "layer_correlation" / "correlation.npz") as data:
        corr, edges = data["correlation"].astype(float), data["edges"]
    for r in last:  # the saved matrix gives the recorded mean |correlation| (float16: 3 digits)
        i, j = layers.index(r["layer_a"]), layers.index(r["layer_b"])
        block = np.abs(corr[edges[i]:edges[i + 1], edges[j]:edges[j + 1]])
        assert np.nanmean(block) == pytest.approx(r["mean_abs_correlation"], abs=2e-3)
    image = figures["layer_correlation/correlation.png"]().axes[0].images[0].get_array()
    np.testing.assert_allclose(np.ma.filled(image, np.nan), corr, equal_nan=True)

    records = read_jsonl(off / "activation_stats.jsonl")
    last = [r for r in records if r["epoch"] == records[-1]["epoch"]]
    axes = figures["activation_stats/overview.png"]().axes
    assert [p.get_height() for p in axes[0].patches] == pytest.approx([r["mean"] for r in last])
    assert [p.get_height() for p in axes[6].patches] == pytest.approx([r["effective_rank"] for r in last])

    record = [r for r in read_jsonl(off / "confidence.jsonl") if r["stage"] == "val"][-1]
    counts = figures["confidence/val_confusion.png"]().axes[0].images[0].get_array()
    np.testing.assert_array_equal(counts, np.asarray(record["confusion_matrix"], dtype=float))

    record = read_jsonl(off / "noise_robustness.jsonl")[-1]
    bars = figures["noise_robustness/histogram.png"]().axes[0].patches
    assert sum(p.get_height() for p in bars) == record["num_samples"]


def test_bad_input_is_one_error_line_before_any_drawing(runs, tmp_path, capsys):
    _, off = runs
    for argv, expected in (([str(tmp_path / "missing")], "holds neither"),
                           ([str(off), "--probes", "layer_correlation,nope"], "nope"),
                           ([str(off), "--unknown_flag"], "plot --help")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and expected in err[0]
    assert not (tmp_path / "missing").exists()


def test_probes_chooses_which_are_drawn(runs, tmp_path):
    _, off = runs
    main([str(off), "--probes", "alignment", "--output", str(tmp_path), "--no_progress"])
    assert _pngs(tmp_path) == {"alignment/distributions.png"}
