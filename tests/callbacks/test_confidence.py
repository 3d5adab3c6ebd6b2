import logging

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torchmetrics.functional.classification import multiclass_calibration_error, multiclass_f1_score

from lightning_probes import ConfidenceMonitor
from tests.conftest import CaptureLogger
from tests.helpers import RandomDataModule, read, small_mlp, trainer


class OutputRecorder(pl.Callback):
    """Reference: keeps every validation logit and target of the last epoch."""

    def on_validation_epoch_start(self, trainer, pl_module):
        self.logits, self.targets = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.logits.append(outputs["logits"].clone())
        self.targets.append(outputs["target"].clone())


def test_record_matches_independent_computation(tmp_path):
    recorder = OutputRecorder()
    logger = CaptureLogger()
    probe = ConfidenceMonitor(n_bins=10, output_dir=str(tmp_path))
    trainer(tmp_path, [recorder, probe], logger=logger, max_epochs=2).fit(small_mlp(), RandomDataModule())
    records = read(tmp_path / "confidence.jsonl")
    assert [(r["epoch"], r["stage"]) for r in records] == [(0, "val"), (1, "val")]
    last = records[-1]
    logits, target = torch.cat(recorder.logits), torch.cat(recorder.targets)
    probs = logits.softmax(1)
    pred = probs.argmax(1).numpy()
    assert last["n"] == 32
    counts = np.zeros((10, 10), int)
    np.add.at(counts, (target.numpy(), pred), 1)
    assert last["confusion_matrix"] == counts.tolist()
    cell = np.asarray(last["confidence_matrix"], dtype=float)
    for t, p, c in zip(target.numpy(), pred, probs.max(1).values.numpy()):
        same = (target.numpy() == t) & (pred == p)
        assert cell[t, p] == pytest.approx(probs.max(1).values.numpy()[same].mean(), rel=1e-6)
        assert c > 0
    assert last["accuracy"] == pytest.approx((pred == target.numpy()).mean())
    assert last["ece"] == pytest.approx(multiclass_calibration_error(probs, target, 10, 10).item(), abs=1e-6)
    assert last["macro_f1"] == pytest.approx(multiclass_f1_score(probs, target, 10, average="macro").item(), abs=1e-6)
    assert last["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-5)
    assert "confidence/val/ece" in logger.keys()
    for name in ("val_confusion.png", "val_confusion_thresholds.png", "val_calibration.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "confidence/val/calibration" in logger.figures


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_test_stage_prints_a_table(tmp_path):
    probe = ConfidenceMonitor(output_dir=str(tmp_path))
    model, data = small_mlp(), RandomDataModule()
    t = trainer(tmp_path, [probe], max_epochs=1)
    t.fit(model, data)
    handler = _Collect()
    console = logging.getLogger("pytorch_lightning")  # where rank_zero_info reaches the console
    console.addHandler(handler)
    try:
        t.test(model, dataloaders=data.val_dataloader())
    finally:
        console.removeHandler(handler)
    printed = "\n".join(handler.messages)
    assert "ConfidenceMonitor (test)" in printed and "adaptive ECE" in printed
    assert [r["stage"] for r in read(tmp_path / "confidence.jsonl")] == ["val", "test"]  # one file, appended
    assert len(list(tmp_path.glob("confidence*.jsonl"))) == 1
    assert (tmp_path / "test_confusion.png").exists()


class _LossOnly(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.layer(x.flatten(1))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return {"loss": self.training_step(batch, batch_idx), "preds": self(batch[0])}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_missing_keys_error_lists_the_keys_found(tmp_path):
    with pytest.raises(KeyError, match=r"`logits` and `target`.*found \['loss', 'preds'\]"):
        trainer(tmp_path, [ConfidenceMonitor()], max_epochs=1).fit(_LossOnly(), RandomDataModule())


class _TorchvisionClassifier(pl.LightningModule):
    """A classifier the probe has never seen: torchvision's ResNet-18, returning custom keys."""

    def __init__(self):
        super().__init__()
        import torchvision

        self.model = torchvision.models.resnet18(num_classes=4)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return {"scores": self.model(batch[0]), "labels": batch[1]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_works_on_a_torchvision_model(tmp_path):
    probe = ConfidenceMonitor(logits_key="scores", target_key="labels", output_dir=str(tmp_path))
    data = RandomDataModule(n=24, batch_size=8, shape=(3, 32, 32), num_classes=4)
    trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1).fit(_TorchvisionClassifier(), data)
    record = read(tmp_path / "confidence.jsonl")[0]
    assert record["n"] == 24 and np.asarray(record["confusion_matrix"]).shape == (4, 4)


def test_collapse_is_detected(tmp_path):
    model = small_mlp(lr=1e-9)
    with torch.no_grad():
        model.net.fc4.bias[3] = 100.0  # every prediction is class 3
    probe = ConfidenceMonitor(output_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="predictions collapsed"):
        trainer(tmp_path, [probe], max_epochs=1).fit(model, RandomDataModule())
    record = read(tmp_path / "confidence.jsonl")[0]
    assert record["top_class_share"] == 1.0 and record["prediction_entropy_normalized"] == pytest.approx(0.0)
    assert record["predicted_distribution"][3] == 1.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_bins": 0}, "`n_bins`"),
    ({"confidence_thresholds": (0.5, 1.5)}, r"`confidence_thresholds` to be in \(0, 1\]"),
    ({"collapse_entropy": 2}, "`collapse_entropy`"),
    ({"logits_key": ""}, "`logits_key`"),
    ({"adaptive_resolution": 5, "n_bins": 15}, "`adaptive_resolution`"),
    ({"min_count": 0}, "`min_count`"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConfidenceMonitor(**kwargs)
