"""Four-layer perceptron with batch norm, for MNIST-shaped inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLPNet(nn.Module):
    """``Linear -> BatchNorm1d -> ReLU`` blocks followed by a final ``Linear`` to the classes.

    With the default widths this is 784-512-256-128-10: four Linear layers (``fc1`` .. ``fc4``),
    three batch norms (``bn1`` .. ``bn3``) and three ReLUs (``relu1`` .. ``relu3``).

    Args:
        in_features: Flattened input size (``in_channels * input_size**2``).
        num_classes: Number of output logits.
        hidden: Widths of the three hidden layers.
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: Sequence[int] = (512, 256, 128)):
        super().__init__()
        widths = [in_features, *hidden]
        self.flatten = nn.Flatten()
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            self.add_module(f"fc{i}", nn.Linear(fan_in, fan_out, bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm1d(fan_out))
            self.add_module(f"relu{i}", nn.ReLU())
        self.num_hidden = len(hidden)
        self.add_module(f"fc{len(widths)}", nn.Linear(widths[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)  # (batch, in_features)
        for i in range(1, self.num_hidden + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"fc{i}")(x)))
        return getattr(self, f"fc{self.num_hidden + 1}")(x)
