"""Models of the classic small-network studies, each a thin `ImageClassifier` subclass, and the meta-network."""

from lightning_probes.models.base import ImageClassifier
from lightning_probes.models.classifiers import MLP, BaselineNet, BatchNormNet, DropoutNet, LeNet5
from lightning_probes.models.metanet import MetaNet, compute_baselines

__all__ = ["BaselineNet", "BatchNormNet", "DropoutNet", "ImageClassifier", "LeNet5", "MLP", "MetaNet",
           "compute_baselines"]
