"""Datasets for the tutorial: CIFAR-10 from a local archive, or a built-in set that needs no download."""

from dualmode.data.builtin import builtin_dataset
from dualmode.data.cifar import cifar10
from dualmode.data.dataset import ImageDataset
from dualmode.data.load import load_dataset

__all__ = [
    "ImageDataset",
    "builtin_dataset",
    "cifar10",
    "load_dataset",
]
