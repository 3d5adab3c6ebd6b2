"""Plain ``nn.Module`` networks, free of any Lightning code."""

from models.components.conv_net import ConvNet
from models.components.lenet5 import LeNet5Net
from models.components.mlp import MLPNet

__all__ = ["ConvNet", "LeNet5Net", "MLPNet"]
