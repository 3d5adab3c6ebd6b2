"""DataModules for MNIST, CIFAR-10 and scikit-learn's bundled digits."""

from datamodules.base import ImageDataModule, TensorImageDataset
from datamodules.cifar10 import CIFAR10DataModule
from datamodules.digits import DigitsDataModule
from datamodules.mnist import MNISTDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "ImageDataModule", "MNISTDataModule", "TensorImageDataset"]
