"""The built-in dataset used when no CIFAR-10 is given: real handwritten digits, shaped like CIFAR-10.

scikit-learn ships 1,797 real 8x8 grey images of the digits 0-9 (UCI "Optical Recognition of
Handwritten Digits", 43 writers) inside the package, so nothing is downloaded. Each image is
upscaled to 32x32 (bilinear) and given a colour: the ink takes a random RGB tint drawn once per
image from a fixed seed, independent of the label, so the three channels differ without the colour
telling the class. The split is stratified and fixed (seeded), 80% train / 20% test.
"""

import numpy as np
import torch
from torch.nn import functional as F

from dualmode.apps.data.dataset import ImageDataset, normalize_

__all__ = ["DIGIT_CLASSES", "builtin_dataset"]

DIGIT_CLASSES = tuple(str(digit) for digit in range(10))
_SEED = 0
_TEST_FRACTION = 0.2
_SIZE = 32
_TINT_RANGE = (0.3, 1.0)  # lower bound keeps every channel's ink visible


def builtin_dataset(train: bool = True) -> ImageDataset:
    """scikit-learn's handwritten digits as 32x32 RGB images in 10 classes (1,437 train / 360 test).

    Args:
        train: the training split if true, else the held-out test split (disjoint, same every call).

    Returns:
        An :class:`ImageDataset`: float32 images (N, 3, 32, 32) normalised per channel with the
        training split's mean and standard deviation, and int64 labels 0-9.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(
            "the built-in dataset (scikit-learn's digits) needs scikit-learn: pip install 'dualmode[tutorial]'"
        ) from error

    pixels, labels = load_digits(return_X_y=True)
    images = _as_rgb32(pixels)
    index = np.arange(len(labels))
    train_index, test_index = train_test_split(
        index, test_size=_TEST_FRACTION, random_state=_SEED, stratify=labels
    )
    # Normalise both splits with the training split's statistics, as one would with CIFAR-10.
    train_images = images[torch.from_numpy(train_index)]
    mean = train_images.mean(dim=(0, 2, 3))
    std = train_images.std(dim=(0, 2, 3))

    chosen = train_index if train else test_index
    split = "train" if train else "test"
    return ImageDataset(
        normalize_(images[torch.from_numpy(chosen)], mean, std),
        torch.from_numpy(labels[chosen]).long(),
        DIGIT_CLASSES,
        name=f"built-in digits {split} ({len(chosen)} scikit-learn handwritten digits, 8x8 upscaled to 32x32 RGB)",
    )


def _as_rgb32(pixels: np.ndarray) -> torch.Tensor:
    """(N, 64) grey levels 0-16 -> float32 (N, 3, 32, 32) in [0, 1], ink tinted per image."""
    grey = torch.from_numpy(pixels).float().div_(16.0).view(-1, 1, 8, 8)
    grey = F.interpolate(grey, size=(_SIZE, _SIZE), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    # Drawn for all images in their original order, so an image keeps its tint whatever the split.
    tint = np.random.default_rng(_SEED).uniform(*_TINT_RANGE, size=(len(pixels), 3))
    return grey * torch.from_numpy(tint).float().view(-1, 3, 1, 1)
