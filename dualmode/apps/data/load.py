"""One entry point for the tutorial and benchmarks: CIFAR-10 when a directory is given, else the built-in set."""

from dualmode.apps.data.builtin import builtin_dataset
from dualmode.apps.data.cifar import cifar10
from dualmode.apps.data.dataset import ImageDataset

__all__ = ["load_dataset"]


def load_dataset(data_dir=None, train: bool = True, *, check_md5: bool = True) -> ImageDataset:
    """CIFAR-10 from ``data_dir`` (see :func:`cifar10`), or the built-in digits when it is ``None``.

    Both give float32 (N, 3, 32, 32) normalised images and int64 labels in 10 classes; ``.name``
    says which one was loaded.

    Example:
        >>> data = load_dataset(train=False)
        >>> data.images.shape, len(data.classes)
        (torch.Size([360, 3, 32, 32]), 10)
    """
    if data_dir is None:
        return builtin_dataset(train=train)
    return cifar10(data_dir, train=train, check_md5=check_md5)
