"""Models of the classic small-network studies, each a thin `ImageClassifier` subclass."""

from models.base import ImageClassifier
from models.classifiers import MLP, BaselineNet, BatchNormNet, DropoutNet, LeNet5

__all__ = ["BaselineNet", "BatchNormNet", "DropoutNet", "ImageClassifier", "LeNet5", "MLP"]
