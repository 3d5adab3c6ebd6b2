"""The five LightningModules: thin subclasses of `ImageClassifier` that pick a network."""

from __future__ import annotations

from typing import Literal

from torch import nn

from models.base import ImageClassifier, LRSchedule
from models.components import ConvNet, LeNet5Net, MLPNet


class BaselineNet(ImageClassifier):
    """Small CIFAR-10 CNN: two conv blocks (conv, ReLU, max-pool), flatten, ``fc1`` (+ReLU), ``fc2``.

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of classes.
        input_size: Side of the square input images.
        lr: Initial SGD learning rate, > 0.
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 penalty, >= 0.
        lr_schedule: ``"none"``, ``"inverse_time"`` or ``"step"`` (see `ImageClassifier`).
        lr_decay: Decay rate of the ``inverse_time`` schedule.
        step_size: Epochs between decays of the ``step`` schedule.
        gamma: Factor of the ``step`` schedule.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "none",
        lr_decay: float = 0.1,
        step_size: int = 10,
        gamma: float = 0.5,
    ) -> None:
        super().__init__(in_channels, num_classes, input_size, lr, momentum, weight_decay,
                         lr_schedule, lr_decay, step_size, gamma)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        return ConvNet(hp.in_channels, hp.num_classes, hp.input_size)


class DropoutNet(ImageClassifier):
    """BaselineNet with one ``nn.Dropout(dropout)`` after ``fc1``'s activation.

    Args:
        dropout: Dropout probability, in [0, 1).
        in_channels: Channels of the input images.
        num_classes: Number of classes.
        input_size: Side of the square input images.
        lr: Initial SGD learning rate, > 0.
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 penalty, >= 0.
        lr_schedule: ``"none"``, ``"inverse_time"`` or ``"step"`` (see `ImageClassifier`).
        lr_decay: Decay rate of the ``inverse_time`` schedule.
        step_size: Epochs between decays of the ``step`` schedule.
        gamma: Factor of the ``step`` schedule.
    """

    def __init__(
        self,
        dropout: float = 0.5,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "none",
        lr_decay: float = 0.1,
        step_size: int = 10,
        gamma: float = 0.5,
    ) -> None:
        if not 0 <= dropout < 1:
            raise ValueError(f"Expected `dropout` to be in [0, 1), but got {dropout!r}")
        super().__init__(in_channels, num_classes, input_size, lr, momentum, weight_decay,
                         lr_schedule, lr_decay, step_size, gamma)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        return ConvNet(hp.in_channels, hp.num_classes, hp.input_size, dropout=hp.dropout)


class BatchNormNet(ImageClassifier):
    """BaselineNet with batch norm after each convolution and after ``fc1``.

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of classes.
        input_size: Side of the square input images.
        lr: Initial SGD learning rate, > 0.
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 penalty, >= 0.
        lr_schedule: ``"none"``, ``"inverse_time"`` or ``"step"`` (see `ImageClassifier`).
        lr_decay: Decay rate of the ``inverse_time`` schedule.
        step_size: Epochs between decays of the ``step`` schedule.
        gamma: Factor of the ``step`` schedule.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "none",
        lr_decay: float = 0.1,
        step_size: int = 10,
        gamma: float = 0.5,
    ) -> None:
        super().__init__(in_channels, num_classes, input_size, lr, momentum, weight_decay,
                         lr_schedule, lr_decay, step_size, gamma)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        return ConvNet(hp.in_channels, hp.num_classes, hp.input_size, batch_norm=True)


class MLP(ImageClassifier):
    """Four Linear layers with BatchNorm1d and ReLU (784-512-256-128-10 on MNIST).

    Args:
        hidden: Widths of the three hidden layers.
        in_channels: Channels of the input images.
        num_classes: Number of classes.
        input_size: Side of the square input images.
        lr: Initial SGD learning rate, > 0.
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 penalty, >= 0.
        lr_schedule: ``"none"``, ``"inverse_time"`` or ``"step"`` (see `ImageClassifier`).
        lr_decay: Decay rate of the ``inverse_time`` schedule.
        step_size: Epochs between decays of the ``step`` schedule.
        gamma: Factor of the ``step`` schedule.
    """

    def __init__(
        self,
        hidden: tuple[int, int, int] = (512, 256, 128),
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
        if len(hidden) != 3 or any(int(h) < 1 for h in hidden):
            raise ValueError(f"Expected `hidden` to be three positive widths, but got {hidden!r}")
        super().__init__(in_channels, num_classes, input_size, lr, momentum, weight_decay,
                         lr_schedule, lr_decay, step_size, gamma)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        return MLPNet(hp.in_channels * hp.input_size**2, hp.num_classes, hp.hidden)


class LeNet5(ImageClassifier):
    """LeNet-5 with named submodules (``conv1``, ``pool1``, ``conv2``, ``pool2``, ``fc1``, ``fc2``, ``fc3``).

    Args:
        activation: ``"relu"`` or ``"tanh"``.
        in_channels: Channels of the input images.
        num_classes: Number of classes.
        input_size: Side of the square input images.
        lr: Initial SGD learning rate, > 0.
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 penalty, >= 0.
        lr_schedule: ``"none"``, ``"inverse_time"`` or ``"step"`` (see `ImageClassifier`).
        lr_decay: Decay rate of the ``inverse_time`` schedule.
        step_size: Epochs between decays of the ``step`` schedule.
        gamma: Factor of the ``step`` schedule.
    """

    def __init__(
        self,
        activation: Literal["relu", "tanh"] = "relu",
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
        if activation not in ("relu", "tanh"):
            raise ValueError(f"Expected `activation` to be one of ('relu', 'tanh'), but got {activation!r}")
        super().__init__(in_channels, num_classes, input_size, lr, momentum, weight_decay,
                         lr_schedule, lr_decay, step_size, gamma)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        return LeNet5Net(hp.in_channels, hp.num_classes, hp.input_size, hp.activation)
