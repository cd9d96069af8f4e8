"""Models for the tutorial and the benchmarks (written here: there is no torchvision)."""

from dualmode.apps.models.mlp import mlp
from dualmode.apps.models.mobilenet_v2 import MobileNetV2, mobilenet_v2

__all__ = [
    "MobileNetV2",
    "mlp",
    "mobilenet_v2",
]
