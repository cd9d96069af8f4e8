"""A small multilayer perceptron for benchmarks, where MobileNetV2 would be too slow to repeat."""

from torch import nn

__all__ = ["mlp"]


def mlp(in_features: int = 3072, hidden: int = 512, num_classes: int = 10, depth: int = 2) -> nn.Sequential:
    """Flatten -> ``depth`` x (Linear -> ReLU) -> Linear.

    The default is 3072-512-512-10: it takes CIFAR-shaped (N, 3, 32, 32) batches like MobileNetV2.

    Args:
        in_features: inputs after flattening (3 * 32 * 32 for CIFAR-10).
        hidden: width of every hidden layer.
        num_classes: outputs of the last layer.
        depth: number of hidden layers (0 gives a linear classifier).

    Example:
        >>> import torch
        >>> mlp()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    for name, value, least in (("in_features", in_features, 1), ("hidden", hidden, 1),
                               ("num_classes", num_classes, 1), ("depth", depth, 0)):
        if value < least:
            raise ValueError(f"mlp: {name} must be at least {least}, got {name}={value}")
    layers = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
