"""Models for the tutorial and the benchmarks (written here: there is no torchvision)."""

from dualmode.models.mlp import mlp
from dualmode.models.mobilenet_v2 import MobileNetV2
from dualmode.models.mobilenet_v2 import mobilenet_v2

__all__ = [
    "MobileNetV2",
    "mlp",
    "mobilenet_v2",
]
