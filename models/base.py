"""`ImageClassifier`: the LightningModule every model of the project shares."""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

LRSchedule = Literal["none", "inverse_time", "step"]
_SCHEDULES = ("none", "inverse_time", "step")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}")


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier around a plain network ``self.net``: loss, metrics, SGD and schedule.

    Subclasses only build ``self.net`` in ``build_network``. Metrics are logged per epoch as
    ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/f1`` (macro), ``test/loss``,
    ``test/acc`` and ``test/f1``. ``validation_step`` and ``test_step`` return
    ``{"loss", "logits", "target"}`` so callbacks can read predictions without hidden attributes.

    Args:
        in_channels: Channels of the input images (1 for MNIST and digits, 3 for CIFAR-10).
        num_classes: Number of classes.
        input_size: Side of the square input images (28 for MNIST and digits, 32 for CIFAR-10).
        lr: Initial SGD learning rate, > 0.
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 penalty, >= 0.
        lr_schedule: ``"none"``; ``"inverse_time"``: ``lr / (1 + lr_decay * epoch)``; ``"step"``:
            multiply by ``gamma`` every ``step_size`` epochs.
        lr_decay: Decay rate of the ``inverse_time`` schedule, >= 0.
        step_size: Epochs between decays of the ``step`` schedule, >= 1.
        gamma: Factor of the ``step`` schedule, in (0, 1].
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "none",
        lr_decay: float = 0.1,
        step_size: int = 10,
        gamma: float = 0.5,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("input_size", input_size), ("step_size", step_size)):
            _check_positive_int(name, value)
        if num_classes < 2:
            raise ValueError(f"Expected `num_classes` to be at least 2, but got {num_classes}")
        if not lr > 0:
            raise ValueError(f"Expected `lr` to be a positive float, but got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"Expected `momentum` to be in [0, 1), but got {momentum!r}")
        if not weight_decay >= 0:
            raise ValueError(f"Expected `weight_decay` to be >= 0, but got {weight_decay!r}")
        if lr_schedule not in _SCHEDULES:
            raise ValueError(f"Expected `lr_schedule` to be one of {_SCHEDULES}, but got {lr_schedule!r}")
        if not lr_decay >= 0:
            raise ValueError(f"Expected `lr_decay` to be >= 0, but got {lr_decay!r}")
        if not 0 < gamma <= 1:
            raise ValueError(f"Expected `gamma` to be in (0, 1], but got {gamma!r}")
        self.save_hyperparameters()
        self.net = self.build_network()
        self.example_input_array = torch.zeros(2, in_channels, input_size, input_size)
        metrics = {"acc": MulticlassAccuracy(num_classes, average="micro"),
                   "f1": MulticlassF1Score(num_classes, average="macro")}
        # One metric object per stage, as torchmetrics recommends.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = nn.ModuleDict({k: m.clone() for k, m in metrics.items()})
        self.test_metrics = nn.ModuleDict({k: m.clone() for k, m in metrics.items()})

    def build_network(self) -> nn.Module:
        """Return the plain network; subclasses override this."""
        raise NotImplementedError(f"{type(self).__name__} must implement `build_network`")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: Any, stage: str, metrics: nn.ModuleDict) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "val", sync_dist=True)
        for name, metric in metrics.items():
            metric(logits, y)
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "acc")
        return {"loss": loss.detach(), "logits": logits.detach(), "target": y}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "test", self.test_metrics)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "none":
            return optimizer
        if hp.lr_schedule == "inverse_time":
            decay = hp.lr_decay
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0 / (1.0 + decay * epoch))
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.step_size, gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
