"""Plain ``nn.Module`` networks, free of any Lightning code."""

from lightning_probes.models.components.conv_net import ConvNet
from lightning_probes.models.components.lenet5 import LeNet5Net
from lightning_probes.models.components.mlp import MLPNet

__all__ = ["ConvNet", "LeNet5Net", "MLPNet"]
