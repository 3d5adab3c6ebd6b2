import logging
import re

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)

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
    assert [(r["epoch"], r["stage"], r["dataloader_idx"]) for r in records] == [(0, "val", 0), (1, "val", 0)]
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
        assert (tmp_path / "confidence" / name).stat().st_size > 1000
    assert "confidence/val/calibration" in logger.figures
    assert probe.last_results["val"]["ece"] == last["ece"]


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
    assert (tmp_path / "confidence" / "test_confusion.png").exists()
    test_ece = read(tmp_path / "confidence.jsonl")[-1]["ece"]
    assert t.callback_metrics["confidence/test/ece"].item() == pytest.approx(test_ece)


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


class _TrainingCounter(pl.Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, *args):
        self.batches += 1


def test_wrong_contract_fails_in_the_sanity_check(tmp_path):
    counter = _TrainingCounter()
    t = trainer(tmp_path, [ConfidenceMonitor(), counter], max_epochs=1, num_sanity_val_steps=1)
    with pytest.raises(KeyError, match=r"found \['loss', 'preds'\]"):
        t.fit(_LossOnly(), RandomDataModule())
    assert counter.batches == 0  # it failed in the sanity check, before any training step


def test_sanity_check_batches_are_not_counted(tmp_path):
    probe = ConfidenceMonitor(output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1, num_sanity_val_steps=2).fit(small_mlp(), RandomDataModule())
    records = read(tmp_path / "confidence.jsonl")
    assert [r["n"] for r in records] == [32]  # the 32 validation samples once, not + 2 sanity batches


class _Returns(pl.LightningModule):
    """A linear classifier whose ``validation_step`` returns ``make(logits, target, batch_idx)``; optional
    several validation loaders (``loaders``: list of ``(x, y)``)."""

    def __init__(self, make=None, loaders=None, num_classes=10):
        super().__init__()
        self.layer = torch.nn.Linear(64, num_classes)
        self.make = make or (lambda logits, target, batch_idx: {"logits": logits, "target": target})
        self.loaders = loaders

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.layer(batch[0].flatten(1)), batch[1])

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return self.make(self.layer(batch[0].flatten(1)), batch[1], batch_idx)

    def val_dataloader(self):
        return [DataLoader(TensorDataset(x, y), batch_size=8) for x, y in self.loaders]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _out_of_range(logits, target, batch_idx):
    return {"logits": logits, "target": torch.where(torch.arange(len(target)) == 1, 12, target)}


def _soft(logits, target, batch_idx):
    return {"logits": logits, "target": torch.full_like(logits, 0.1)}


@pytest.mark.parametrize(("make", "match"), [
    # One logit per sample is a binary classifier: its targets must be 0 or 1.
    (lambda lg, t, i: {"logits": lg[:, 0], "target": t}, r"`target`.*value \d, outside the class range \[0, 1\]"),
    (lambda lg, t, i: {"logits": lg[:, :1], "target": t}, r"`target`.*value \d, outside the class range \[0, 1\]"),
    (lambda lg, t, i: {"logits": lg[:, :1], "target": t[:8] % 2}, r"`target`.*\(16,\) \(binary labels 0/1\).*"
                                                                   r"got shape \(8,\)"),
    (lambda lg, t, i: {"logits": lg[:, 0], "target": t / 10}, r"`target`.*rows are soft labels"),
    (lambda lg, t, i: {"logits": lg[0, 0], "target": t}, r"`logits`.*\(N, C\).*got shape \(\)"),
    (lambda lg, t, i: {"logits": lg, "target": t[:8]}, r"`target`.*shape \(16,\).*\(16, 10\).*got shape \(8,\)"),
    (lambda lg, t, i: {"logits": lg, "target": t.float()}, r"`target`.*integer dtype, but got torch.float32"),
    (lambda lg, t, i: {"logits": lg, "target": "cat"}, r"`target`.*a tensor, but got str"),
    (_out_of_range, r"`target`.*value 12, outside the class range \[0, 9\]"),
    (_soft, r"`target`.*16 rows are soft labels"),
])
def test_bad_outputs_fail_in_the_sanity_check_with_a_clear_error(tmp_path, make, match):
    counter = _TrainingCounter()
    t = trainer(tmp_path, [ConfidenceMonitor(), counter], max_epochs=1, num_sanity_val_steps=1)
    with pytest.raises(ValueError, match=match):
        t.fit(_Returns(make), RandomDataModule())
    assert counter.batches == 0


def test_a_bad_target_after_the_first_batch_is_reported_after_the_epoch(tmp_path):
    def make(logits, target, batch_idx):  # valid in batch 0 (checked on the host), bad in batch 1
        return {"logits": logits, "target": target - 3 * (batch_idx == 1)}

    with pytest.raises(ValueError, match=r"value -3, outside the class range \[0, 9\].*`ignore_index`"):
        trainer(tmp_path, [ConfidenceMonitor(output_dir=str(tmp_path))], max_epochs=1).fit(
            _Returns(make), RandomDataModule())
    assert not (tmp_path / "confidence.jsonl").exists() or read(tmp_path / "confidence.jsonl") == []


class _Segmenter(pl.LightningModule):
    """1x1 convolution over 3x4x4 images: logits (N, 3, 4, 4), target (N, 4, 4) with 255 = unlabelled."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 1)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.conv(batch[0]), batch[1], ignore_index=255)

    def validation_step(self, batch, batch_idx):
        return {"logits": self.conv(batch[0]), "target": batch[1]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_segmentation_logits_with_ignore_index_agree_with_torchmetrics(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 4, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 0] > 1).long()  # (40, 4, 4) in {0, 1, 2}
    y[torch.rand(y.shape, generator=g) < 0.2] = 255
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    recorder = OutputRecorder()
    probe = ConfidenceMonitor(n_bins=10, ignore_index=255, output_dir=str(tmp_path))
    trainer(tmp_path, [recorder, probe], max_epochs=1, num_sanity_val_steps=1).fit(_Segmenter(), loader, loader)
    record = read(tmp_path / "confidence.jsonl")[0]
    probs, target = torch.cat(recorder.logits).softmax(1), torch.cat(recorder.targets)  # (40, 3, 4, 4), (40, 4, 4)
    assert record["n"] == int((target != 255).sum())
    kwargs = {"ignore_index": 255}
    assert record["ece"] == pytest.approx(multiclass_calibration_error(probs, target, 3, 10, **kwargs).item(), abs=1e-6)
    assert record["accuracy"] == pytest.approx(
        multiclass_accuracy(probs, target, 3, average="micro", **kwargs).item(), abs=1e-6)
    assert record["confusion_matrix"] == multiclass_confusion_matrix(probs, target, 3, **kwargs).tolist()


def test_one_hot_targets_give_the_record_of_index_targets(tmp_path):
    def one_hot(logits, target, batch_idx):
        return {"logits": logits, "target": torch.nn.functional.one_hot(target, 10).float()}

    records = []
    for i, module in enumerate((_Returns(), _Returns(one_hot))):
        torch.manual_seed(0)
        module.layer.reset_parameters()
        out = tmp_path / str(i)
        trainer(out, [ConfidenceMonitor(output_dir=str(out))]).validate(
            module, RandomDataModule().val_dataloader(), verbose=False)
        records.append({k: v for k, v in read(out / "confidence.jsonl")[0].items() if k not in ("step", "epoch")})
    assert records[0]["n"] == 32 and records[0] == records[1]


def test_several_validation_loaders_are_reported_separately(tmp_path):
    data = RandomDataModule()
    loaders = [(data.x[:32], data.y[:32]), (data.x[32:56], data.y[32:56])]
    logger = CaptureLogger()
    probe = ConfidenceMonitor(n_bins=10, output_dir=str(tmp_path))
    module = _Returns(loaders=loaders)
    t = trainer(tmp_path, [probe], max_epochs=1, logger=logger)
    t.fit(module, train_dataloaders=data.train_dataloader())
    records = read(tmp_path / "confidence.jsonl")
    assert [(r["stage"], r["dataloader_idx"], r["n"]) for r in records] == [("val", 0, 32), ("val", 1, 24)]
    for (x, y), record in zip(loaders, records):
        probs = module.layer(x.flatten(1)).detach().softmax(1)
        assert record["ece"] == pytest.approx(multiclass_calibration_error(probs, y, 10, 10).item(), abs=1e-6)
        assert record["confusion_matrix"] == multiclass_confusion_matrix(probs, y, 10).tolist()
    assert {"confidence/val/ece/dataloader_idx_0", "confidence/val/ece/dataloader_idx_1"} <= logger.keys()
    assert not any(k == "confidence/val/ece" for k in logger.keys())
    assert t.callback_metrics["confidence/val/ece/dataloader_idx_1"].item() == pytest.approx(records[1]["ece"])
    assert set(probe.last_results) == {"val/dataloader_idx_0", "val/dataloader_idx_1"}
    assert (tmp_path / "confidence" / "val_dataloader_idx_1_calibration.png").exists()
    assert "confidence/val/calibration/dataloader_idx_1" in logger.figures


def test_headline_metrics_drive_early_stopping_and_checkpoints(tmp_path):
    probe = ConfidenceMonitor(output_dir=str(tmp_path / "probes"))
    stopper = EarlyStopping(monitor="confidence/val/ece", mode="min", patience=5)  # strict: errors if not found
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="confidence/val/ece", mode="min")
    t = trainer(tmp_path, [probe, stopper, checkpoint], max_epochs=2, enable_checkpointing=True)
    t.fit(small_mlp(), RandomDataModule())
    records = read(tmp_path / "probes" / "confidence.jsonl")
    assert checkpoint.best_model_score.item() == pytest.approx(min(r["ece"] for r in records), rel=1e-6)
    for metric in ("ece", "accuracy", "prediction_entropy_normalized"):
        assert t.callback_metrics[f"confidence/val/{metric}"].item() == pytest.approx(records[-1][metric], rel=1e-6)


def test_two_named_monitors_write_separate_files_and_scalars(tmp_path):
    recorder = OutputRecorder()
    logger = CaptureLogger()
    coarse = ConfidenceMonitor(n_bins=5, name="coarse", output_dir=str(tmp_path))
    fine = ConfidenceMonitor(n_bins=20, name="fine", output_dir=str(tmp_path))
    trainer(tmp_path, [recorder, coarse, fine], max_epochs=1, logger=logger).fit(small_mlp(), RandomDataModule())
    probs, target = torch.cat(recorder.logits).softmax(1), torch.cat(recorder.targets)
    for probe, n_bins in ((coarse, 5), (fine, 20)):
        record = read(tmp_path / f"{probe.name}.jsonl")[0]
        assert len(record["reliability"]["count"]) == n_bins + 1
        reference = multiclass_calibration_error(probs, target, 10, n_bins).item()
        assert record["ece"] == pytest.approx(reference, abs=1e-6)
        assert (tmp_path / probe.name / "val_calibration.png").exists()
        assert f"{probe.name}/val/ece" in logger.keys() and f"{probe.name}/val/calibration" in logger.figures
    assert not (tmp_path / "confidence.jsonl").exists()
    assert coarse.state_key != fine.state_key
    # The custom-scalars layout: every chart finds its probe's scalars, and every headline scalar is charted.
    for probe in (coarse, fine):
        charts = probe.layout()
        assert {"calibration", "accuracy", "collapse"} <= set(charts)
        own = {k for k in logger.keys() if k.startswith(f"{probe.name}/")}
        for kind, patterns in charts.values():
            assert kind == "Multiline"
            matched = {k for k in logger.keys() if any(re.search(p, k) for p in patterns)}
            assert matched and matched <= own
        charted = {k for k in own if any(re.search(p, k) for _, ps in charts.values() for p in ps)}
        assert {f"{probe.name}/val/{m}" for m in ("ece", "adaptive_ece", "mce", "accuracy", "macro_f1",
                                                    "prediction_entropy_normalized", "top_class_share")} <= charted
        assert f"{probe.name}/val/ece" in charted and f"{probe.name}/val/mce" in charted


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
    ({"confidence_thresholds": (0.5, 1.5)}, r"`confidence_thresholds`.* in \(0, 1\], but got 1.5"),
    ({"ignore_index": 1.5}, "`ignore_index` to be an integer or None"),
    ({"collapse_entropy": 2}, "`collapse_entropy`"),
    ({"logits_key": ""}, "`logits_key`"),
    ({"adaptive_resolution": 5, "n_bins": 15}, "`adaptive_resolution`"),
    ({"min_count": 0}, "`min_count`"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConfidenceMonitor(**kwargs)


class _OneLogitBinary(pl.LightningModule):
    """One logit per sample (BCE); ``validation_step`` returns it as ``(N, 1)`` or ``(N,)`` with 0/1 targets."""

    def __init__(self, shape, target_kind):
        super().__init__()
        self.layer = torch.nn.Linear(64, 1)
        self.shape, self.target_kind = shape, target_kind

    def training_step(self, batch, batch_idx):
        z = self.layer(batch[0].flatten(1))[:, 0]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, (batch[1] % 2).float())

    def validation_step(self, batch, batch_idx):
        z = self.layer(batch[0].flatten(1))
        target = batch[1] % 2
        if self.target_kind == "float":
            target = target.float()
        elif self.target_kind == "column":
            target = target[:, None]
        return {"logits": z if self.shape == "column" else z[:, 0], "target": target}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("shape", "target_kind"), [("column", "long"), ("flat", "long"), ("column", "float"),
                                                    ("column", "column"), ("flat", "float")])
def test_one_logit_binary_classifiers_agree_with_sklearn_and_torchmetrics(tmp_path, shape, target_kind):
    from sklearn.metrics import accuracy_score, brier_score_loss, confusion_matrix, f1_score, log_loss, recall_score
    from torchmetrics.functional.classification import binary_accuracy, binary_confusion_matrix

    recorder = OutputRecorder()
    probe = ConfidenceMonitor(n_bins=10, output_dir=str(tmp_path))
    data = RandomDataModule()
    trainer(tmp_path, [recorder, probe], max_epochs=1, num_sanity_val_steps=1).fit(
        _OneLogitBinary(shape, target_kind), data)
    record = read(tmp_path / "confidence.jsonl")[-1]
    z = torch.cat(recorder.logits).flatten().double()
    y = torch.cat(recorder.targets).flatten().long()
    p = torch.sigmoid(z)  # P(class 1)
    pred = (z > 0).long()  # the sign of the logit
    yn, pn = y.numpy(), p.numpy()
    assert record["n"] == 32 and 0 < pred.sum() < 32
    assert record["accuracy"] == pytest.approx(accuracy_score(yn, pred.numpy()))
    assert record["accuracy"] == pytest.approx(binary_accuracy(p, y).item())
    assert record["confusion_matrix"] == confusion_matrix(yn, pred.numpy(), labels=[0, 1]).tolist()
    assert record["confusion_matrix"] == binary_confusion_matrix(p, y).tolist()
    assert record["nll"] == pytest.approx(log_loss(yn, pn, labels=[0, 1]), rel=1e-5)
    # The multiclass Brier score sums over both classes: twice sklearn's binary Brier score.
    assert record["brier"] == pytest.approx(2 * brier_score_loss(yn, pn), rel=1e-5)
    assert record["per_class_recall"] == pytest.approx(recall_score(yn, pred.numpy(), average=None), abs=1e-12)
    assert record["macro_f1"] == pytest.approx(f1_score(yn, pred.numpy(), average="macro"), abs=1e-12)
    # Top-label confidence max(p, 1 - p): torchmetrics' multiclass ECE of the probabilities [1 - p, p].
    probs = torch.stack([1 - p, p], dim=1).float()
    assert record["ece"] == pytest.approx(multiclass_calibration_error(probs, y, 2, 10).item(), abs=1e-6)
    assert record["mean_confidence"] == pytest.approx(float(torch.maximum(p, 1 - p).mean()), rel=1e-5)


class _BinarySegmenter(_Segmenter):
    """One logit per pixel: logits (N, 1, 4, 4), targets (N, 4, 4) in {0, 1, 255}."""

    def __init__(self, float_target=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        self.float_target = float_target

    def training_step(self, batch, batch_idx):
        return self.conv(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        target = batch[1].float() if self.float_target else batch[1]
        return {"logits": self.conv(batch[0]), "target": target}


def test_one_logit_segmentation_with_ignore_index_agrees_with_torchmetrics(tmp_path):
    from torchmetrics.functional.classification import binary_accuracy, binary_confusion_matrix

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 4, 4, generator=g)
    y = (x[:, 0] > 0.3).long()
    y[torch.rand(y.shape, generator=g) < 0.2] = 255
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    recorder = OutputRecorder()
    probe = ConfidenceMonitor(n_bins=10, ignore_index=255, output_dir=str(tmp_path))
    trainer(tmp_path, [recorder, probe], max_epochs=1).fit(_BinarySegmenter(), loader, loader)
    record = read(tmp_path / "confidence.jsonl")[0]
    p, target = torch.sigmoid(torch.cat(recorder.logits)[:, 0]), torch.cat(recorder.targets)  # (40, 4, 4) each
    assert record["n"] == int((target != 255).sum())
    assert record["accuracy"] == pytest.approx(binary_accuracy(p, target, ignore_index=255).item(), abs=1e-6)
    assert record["confusion_matrix"] == binary_confusion_matrix(p, target, ignore_index=255).tolist()


def test_floating_binary_targets_with_ignore_index_are_refused_at_the_first_batch(tmp_path):
    x = torch.randn(16, 1, 4, 4)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
    t = trainer(tmp_path, [ConfidenceMonitor(ignore_index=255)], max_epochs=1, num_sanity_val_steps=1)
    with pytest.raises(ValueError, match=r"floating binary labels, but `ignore_index=255` needs integer targets"):
        t.fit(_BinarySegmenter(float_target=True), loader, loader)


def test_a_step_output_without_logits_is_refused_by_the_sanity_check_before_any_step(tmp_path):
    """Lightning's BoringModel returns ``{"x": loss}``: the sanity check's first batch refuses the run with one
    configuration error naming the probe (it was a bare KeyError raised from inside the guard), even with
    ``on_error="warn"``; without a sanity check the same finding after the start disables the probe."""
    from pytorch_lightning.demos.boring_classes import BoringModel

    from lightning_probes import ProbeConfigurationError, ProbeDisabledWarning

    def fit(**kwargs):
        t = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2, default_root_dir=str(tmp_path),
                       logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       callbacks=[ConfidenceMonitor(on_error="warn")], **kwargs)
        t.fit(BoringModel())
        return t

    with pytest.raises(ProbeConfigurationError, match=r"^ConfidenceMonitor needs `logits` and `target`.*\['x'\]") \
            as info:
        fit()
    assert isinstance(info.value, KeyError)  # still a KeyError for code that caught one
    with pytest.warns(ProbeDisabledWarning, match="ConfidenceMonitor 'confidence' raised in `on_validation_batch_end`"):
        t = fit(num_sanity_val_steps=0)
    assert t.global_step == 2
