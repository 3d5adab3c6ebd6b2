"""Models of the classic small-network studies, each a thin `ImageClassifier` subclass."""

from lightning_probes.models.base import ImageClassifier
from lightning_probes.models.classifiers import MLP, BaselineNet, BatchNormNet, DropoutNet, LeNet5

__all__ = ["BaselineNet", "BatchNormNet", "DropoutNet", "ImageClassifier", "LeNet5", "MLP"]
