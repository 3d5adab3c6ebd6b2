"""DataModules for MNIST, CIFAR-10 and scikit-learn's bundled digits, and the meta-networks' zoo data set."""

from lightning_probes.datamodules.base import ImageDataModule, TensorImageDataset
from lightning_probes.datamodules.cifar10 import CIFAR10DataModule
from lightning_probes.datamodules.digits import DigitsDataModule
from lightning_probes.datamodules.mnist import MNISTDataModule
from lightning_probes.datamodules.zoo import ZooDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "ImageDataModule", "MNISTDataModule", "TensorImageDataset",
           "ZooDataModule"]
