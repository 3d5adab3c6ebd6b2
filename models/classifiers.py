"""The five LightningModules: thin subclasses of `ImageClassifier` that pick a network.

Each takes its own arguments plus every `ImageClassifier` argument (``in_channels``, ``num_classes``,
``input_size``, ``lr``, ``momentum``, ``weight_decay``, ``lr_schedule``, ``lr_decay``, ``step_size``, ``gamma``,
``init_from``, ``freeze``, ``reinit``)
through ``**kwargs``; LightningCLI follows them to `ImageClassifier` and shows them in ``--help``.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from lightning_probes.models.base import ImageClassifier
from lightning_probes.models.components import ConvNet, LeNet5Net, MLPNet


class BaselineNet(ImageClassifier):
    """Small CIFAR-10 CNN: two conv blocks (conv, ReLU, max-pool), flatten, ``fc1`` (+ReLU), ``fc2``.

    Args:
        in_channels: Channels of the input images.
        input_size: Side of the square input images.
        lr: Initial SGD learning rate, > 0.
        **kwargs: Further `ImageClassifier` arguments.
    """

    #: Keyword arguments of `ConvNet` that make the variant.
    variant: dict[str, Any] = {}

    def __init__(self, in_channels: int = 3, input_size: int = 32, lr: float = 0.01, **kwargs: Any) -> None:
        super().__init__(in_channels=in_channels, input_size=input_size, lr=lr, **kwargs)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        return ConvNet(hp.in_channels, hp.num_classes, hp.input_size, **self.variant_arguments())

    def variant_arguments(self) -> dict[str, Any]:
        return dict(self.variant)


class DropoutNet(BaselineNet):
    """BaselineNet with one ``nn.Dropout(dropout)`` after ``fc1``'s activation.

    Args:
        dropout: Dropout probability, in [0, 1).
        **kwargs: Further `BaselineNet` / `ImageClassifier` arguments.
    """

    def __init__(self, dropout: float = 0.5, **kwargs: Any) -> None:
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"Expected `dropout` to be in [0, 1), but got {dropout!r}")
        super().__init__(**kwargs)

    def variant_arguments(self) -> dict[str, Any]:
        return {"dropout": self.hparams.dropout}


class BatchNormNet(BaselineNet):
    """BaselineNet with batch norm after each convolution and after ``fc1``.

    Args:
        in_channels: Channels of the input images.
        input_size: Side of the square input images.
        lr: Initial SGD learning rate, > 0.
        **kwargs: Further `ImageClassifier` arguments.
    """

    variant = {"batch_norm": True}


class MLP(ImageClassifier):
    """Four Linear layers with BatchNorm1d and ReLU (784-512-256-128-10 on MNIST).

    Args:
        hidden: Widths of the three hidden layers.
        **kwargs: Further `ImageClassifier` arguments (defaults: 1x28x28 inputs, 10 classes, lr 0.05).
    """

    def __init__(self, hidden: tuple[int, int, int] = (512, 256, 128), **kwargs: Any) -> None:
        if len(hidden) != 3 or any(int(h) < 1 for h in hidden):
            raise ValueError(f"Expected `hidden` to be three positive widths, but got {hidden!r}")
        super().__init__(**kwargs)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        return MLPNet(hp.in_channels * hp.input_size**2, hp.num_classes, hp.hidden)


class LeNet5(ImageClassifier):
    """LeNet-5 with named submodules (``conv1``, ``pool1``, ``conv2``, ``pool2``, ``fc1``, ``fc2``, ``fc3``).

    Args:
        activation: ``"relu"`` or ``"tanh"``.
        dropout: Dropout probability after ``fc1`` and ``fc2`` (modules ``drop1``, ``drop2``), in [0, 1).
        padding: Zero padding of ``conv1`` (0, 1 or 2). 2, the default, keeps a 28x28 input's 5x5 ``pool2`` maps
            (400 features); 0 is the original meta-network study's unpadded LeNet5 (``pool2`` 16 x 4 x 4 = 256).
        **kwargs: Further `ImageClassifier` arguments (defaults: 1x28x28 inputs, 10 classes, lr 0.05).
    """

    def __init__(self, activation: Literal["relu", "tanh"] = "relu", dropout: float = 0.0, padding: int = 2,
                 **kwargs: Any) -> None:
        if activation not in ("relu", "tanh"):
            raise ValueError(f"Expected `activation` to be one of ('relu', 'tanh'), but got {activation!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"Expected `dropout` to be in [0, 1), but got {dropout!r}")
        if isinstance(padding, bool) or padding not in (0, 1, 2):
            raise ValueError(f"Expected `padding` to be 0, 1 or 2, but got {padding!r}")
        super().__init__(**kwargs)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        # Checkpoints from before `padding` existed have none in their hyper-parameters: they were padded by 2.
        return LeNet5Net(hp.in_channels, hp.num_classes, hp.input_size, hp.activation, hp.get("dropout", 0.0),
                         hp.get("padding", 2))
