"""The small CIFAR-10 CNN behind BaselineNet, DropoutNet and BatchNormNet."""

from __future__ import annotations

import torch
from torch import nn


def _conv_output_side(side: int) -> int:
    # Two 3x3 'same' convolutions, each followed by a 2x2 max-pool (floor division).
    return side // 2 // 2


class ConvNet(nn.Module):
    """Two conv blocks (conv, [batch norm], ReLU, max-pool), ``fc1`` (+[batch norm], ReLU, [dropout]), ``fc2``.

    Every stage is a named submodule (``conv1``, ``bn1``, ``relu1``, ``pool1``, ..., ``fc1``, ``relu3``,
    ``dropout``, ``fc2``) so that probes can address layers by name.

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of output logits.
        input_size: Side of the square input images (e.g. 32 for CIFAR-10, 28 for MNIST).
        channels: Output channels of the two convolutions.
        hidden: Width of ``fc1``.
        dropout: Dropout probability after ``fc1``'s activation; 0 omits the dropout layer.
        batch_norm: Insert batch norm after each convolution and after ``fc1``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=3, padding=1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(c1) if batch_norm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1, bias=not batch_norm)
        self.bn2 = nn.BatchNorm2d(c2) if batch_norm else nn.Identity()
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        side = _conv_output_side(input_size)
        if side < 1:
            raise ValueError(f"Expected `input_size` to be at least 4, but got {input_size}")
        self.fc1 = nn.Linear(c2 * side * side, hidden, bias=not batch_norm)
        self.bn3 = nn.BatchNorm1d(hidden) if batch_norm else nn.Identity()
        self.relu3 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))  # (batch, c1, side/2, side/2)
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))  # (batch, c2, side/4, side/4)
        x = self.flatten(x)  # (batch, c2 * (side/4)^2)
        x = self.dropout(self.relu3(self.bn3(self.fc1(x))))
        return self.fc2(x)
