"""Datasets for the tutorial: CIFAR-10 from a local archive, or a built-in set that needs no download."""

from dualmode.apps.data.builtin import builtin_dataset
from dualmode.apps.data.cifar import cifar10
from dualmode.apps.data.dataset import ImageDataset
from dualmode.apps.data.load import load_dataset

__all__ = [
    "ImageDataset",
    "builtin_dataset",
    "cifar10",
    "load_dataset",
]
