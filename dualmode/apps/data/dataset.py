"""The in-memory image dataset that both data sources return."""

import torch
from torch.utils.data import Dataset

__all__ = ["ImageDataset", "normalize_"]


class ImageDataset(Dataset):
    """Normalised images and their labels, held as two tensors (like ``TensorDataset``).

    Attributes:
        images: float32 tensor (N, 3, H, W), already normalised per channel.
        labels: int64 tensor (N,), class indices in ``range(len(classes))``.
        classes: class names, index i names label i.
        name: one line saying what the data is, for printing.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes, name: str):
        if images.dim() != 4 or images.dtype != torch.float32:
            raise ValueError(f"images must be a float32 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1] or labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64 of shape ({images.shape[0]},), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.classes = tuple(classes)
        self.name = name

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:])
        return f"ImageDataset({self.name!r}, {len(self)} images of {shape}, {len(self.classes)} classes)"


def normalize_(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalise float (N, C, H, W) images per channel, in place (CIFAR's train set is 600 MB as float32)."""
    mean = torch.as_tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return images.sub_(mean).div_(std)
