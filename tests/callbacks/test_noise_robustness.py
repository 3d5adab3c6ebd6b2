import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_probes import NoiseRobustnessMonitor
from lightning_probes.callbacks.guard import ProbeSkippedWarning
from lightning_probes.probe_data import select_balanced
from tests.conftest import CaptureLogger
from tests.helpers import RandomDataModule, read, small_mlp, trainer


def test_writes_ratios_per_epoch(tmp_path):
    logger = CaptureLogger()
    probe = NoiseRobustnessMonitor(num_samples=20, num_draws=5, sigma=0.5, kl=True, output_dir=str(tmp_path))
    model = small_mlp()
    trainer(tmp_path, [probe], logger=logger, max_epochs=2).fit(model, RandomDataModule())
    assert model.training  # mode restored
    records = read(tmp_path / "noise_robustness.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    data = np.load(tmp_path / "noise_robustness" / "epoch1.npz")
    assert set(data.files) == {"sample_index", "label", "clean_pred", "ratio", "kl"}
    ratio = data["ratio"]
    assert ratio.shape == (20,) and ((ratio >= 0) & (ratio <= 1)).all()
    assert np.all(np.isclose(ratio * 5, np.round(ratio * 5)))  # multiples of 1/num_draws
    assert records[1]["stability_ratio_mean"] == pytest.approx(ratio.mean())
    assert records[1]["stability_ratio_median"] == pytest.approx(np.median(ratio))
    correct = data["clean_pred"] == data["label"]
    if correct.any():
        assert records[1]["stability_ratio_mean_correct"] == pytest.approx(ratio[correct].mean())
    assert records[1]["kl_mean"] >= 0
    # The subset is fixed across epochs.
    assert np.array_equal(np.load(tmp_path / "noise_robustness" / "epoch0.npz")["sample_index"], data["sample_index"])
    assert "noise_robustness/stability_ratio_mean" in logger.keys()
    assert (tmp_path / "noise_robustness" / "histogram.png").exists()


def test_sigma_zero_is_perfectly_stable(tmp_path):
    probe = NoiseRobustnessMonitor(num_samples=16, num_draws=3, sigma=0.0, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1).fit(small_mlp(), RandomDataModule())
    assert read(tmp_path / "noise_robustness.jsonl")[0]["stability_ratio_mean"] == 1.0


def test_eval_mode_during_analysis(tmp_path):
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    model = small_mlp()
    model.net.add_module("spy", Spy())
    model.net.fc1.register_forward_pre_hook(lambda m, args: model.net.spy(args[0]))
    probe = NoiseRobustnessMonitor(num_samples=8, num_draws=2, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(model, RandomDataModule())
    assert seen[-1] is False and True in seen and model.training


def test_select_balanced():
    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 45)
    chosen = select_balanced(labels, 30, seed=0)
    counts = torch.bincount(labels[chosen], minlength=3).tolist()
    assert sum(counts) == 30 and counts[1] == 5 and abs(counts[0] - counts[2]) <= 1
    assert torch.equal(chosen, select_balanced(labels, 30, seed=0))
    assert not torch.equal(chosen, select_balanced(labels, 30, seed=1))
    assert len(select_balanced(labels, 500, seed=0)) == 100


def test_no_validation_data_is_a_clear_error(tmp_path):
    class NoVal(pl.LightningDataModule):
        def train_dataloader(self):
            return RandomDataModule().train_dataloader()

    probe = NoiseRobustnessMonitor()
    t = trainer(tmp_path, [probe], max_epochs=1)
    with pytest.warns(ProbeSkippedWarning, match="NoiseRobustnessMonitor 'noise_robustness' is skipped .* no "
                                                 "validation dataloader"):
        t.fit(small_mlp(), NoVal())  # no validation loop: skipped at the pre-flight, training goes on
    records = read(tmp_path / "probes" / "noise_robustness.jsonl")
    assert len(records) == 1 and records[0]["skipped"] is True and "val_dataloader" in records[0]["reason"]
    assert t.global_step > 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sigma": -0.1}, "`sigma`"),
    ({"num_draws": 0}, "`num_draws`"),
    ({"num_samples": 0}, "`num_samples`"),
    ({"every_n_epochs": 0}, "`every_n_epochs`"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseRobustnessMonitor(**kwargs)
