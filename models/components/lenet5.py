"""LeNet-5 (LeCun et al. 1998), with a selectable activation."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class LeNet5Net(nn.Module):
    """``conv1(6) - pool1 - conv2(16) - pool2 - fc1(120) - fc2(84) - fc3(classes)``.

    ``conv1`` pads by ``padding`` (default 2) so a 28x28 input gives the classic 28 -> 14 -> 10 -> 5 feature maps;
    ``padding=0`` is the unpadded variant of the original meta-network study (24 -> 12 -> 8 -> 4: ``pool2`` has
    16 x 4 x 4 = 256 features).

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of output logits.
        input_size: Side of the square input images.
        activation: ``"relu"`` or ``"tanh"``.
        dropout: Probability of the ``nn.Dropout`` after ``fc1``'s and ``fc2``'s activations (``drop1``,
            ``drop2``), in [0, 1); 0 (the default) is the classic network. Dropout has no weights, so checkpoints
            load whatever its value.
        padding: Zero padding of ``conv1`` on each side, 0, 1 or 2.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        activation: Literal["relu", "tanh"] = "relu",
        dropout: float = 0.0,
        padding: int = 2,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Expected `activation` to be one of {sorted(_ACTIVATIONS)}, but got {activation!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"Expected `dropout` to be in [0, 1), but got {dropout!r}")
        if isinstance(padding, bool) or padding not in (0, 1, 2):
            raise ValueError(f"Expected `padding` to be 0, 1 or 2, but got {padding!r}")
        act = _ACTIVATIONS[activation]
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=padding)
        self.act1 = act()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.act2 = act()
        self.pool2 = nn.MaxPool2d(2)
        side = ((input_size + 2 * padding - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"Expected `input_size` to be at least {16 - 2 * padding} for LeNet5 with padding "
                             f"{padding}, but got {input_size}")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.act3 = act()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(120, 84)
        self.act4 = act()
        self.drop2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act1(self.conv1(x)))  # (batch, 6, side/2, side/2)
        x = self.pool2(self.act2(self.conv2(x)))  # (batch, 16, s, s)
        x = self.flatten(x)
        x = self.drop1(self.act3(self.fc1(x)))
        x = self.drop2(self.act4(self.fc2(x)))
        return self.fc3(x)
