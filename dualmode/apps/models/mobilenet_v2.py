"""MobileNetV2 for 32x32 inputs (CIFAR-10), written here because there is no torchvision.

The layer layout, width rounding and initialisation follow torchvision's ``mobilenet_v2``
(Sandler et al., 2018), so the parameter count is the published one. Only strides differ: the
ImageNet network downsamples 224 -> 7 (five stride-2 layers); on 32x32 images that would leave a
1x1 map after the third stage. As in the usual CIFAR port, the stem conv and the first stride-2
stage (24 channels) run at stride 1, so the map goes 32 -> 32 -> 16 -> 8 -> 4.

The attribute names are the ones OneFlow's layer-wise learning-rate tutorial uses:
``features``, ``adaptive_avg_pool2d``, ``classifier`` and ``last_channel``.
"""

from torch import nn

__all__ = ["MobileNetV2", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, stride s of the first block) per stage.
# ImageNet strides are 1, 2, 2, 2, 1, 2, 1; the 24-channel stage is stride 1 here (see module doc).
_CIFAR_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_STEM_STRIDE = 1  # 2 on ImageNet


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10% below ``value``.

    Same rule as the reference implementation, so widths (and parameter counts) match it.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias, BatchNorm follows) -> BatchNorm -> ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3, stride) -> linear projection (1x1), with a skip when shapes agree."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            # The projection is linear (no ReLU6): the paper's "linear bottleneck".
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with the tutorial's attribute names; see :func:`mobilenet_v2`."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes=}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult=}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout=}")

        in_channels = _make_divisible(32 * width_mult)
        # The head never shrinks below 1280 channels, only grows (as in the paper).
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))

        layers = [ConvBNReLU6(3, in_channels, stride=_STEM_STRIDE)]
        for expand_ratio, channels, repeats, stride in _CIFAR_STAGES:
            out_channels = _make_divisible(channels * width_mult)
            for i in range(repeats):
                layers.append(InvertedResidual(in_channels, out_channels, stride if i == 0 else 1, expand_ratio))
                in_channels = out_channels
        layers.append(ConvBNReLU6(in_channels, self.last_channel, kernel_size=1))

        self.features = nn.Sequential(*layers)
        self.adaptive_avg_pool2d = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        self._init_weights()

    def _init_weights(self):
        # Same scheme as the reference implementation.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.features(x)
        x = self.adaptive_avg_pool2d(x)
        return self.classifier(x.flatten(1))


def mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV2:
    """MobileNetV2 for 32x32 images.

    Strides: stem conv 1, stages (16, 24, 32, 64, 96, 160, 320 channels) 1, 1, 2, 2, 1, 2, 1, so a
    32x32 input leaves a 4x4 map of ``last_channel`` features before pooling (ImageNet's network has
    stride 2 in the stem and in the 24-channel stage). Weights and layer shapes are unchanged, so the
    parameter count is the published one: 2,236,682 at width 1.0 with 10 classes.

    Args:
        num_classes: outputs of the final ``nn.Linear``.
        width_mult: scales every layer's channels (rounded to multiples of 8); the last
            conv keeps at least 1280 channels.
        dropout: probability of the ``nn.Dropout`` before the classifier's linear layer.

    Returns:
        A :class:`MobileNetV2` with ``features`` (``nn.Sequential``), ``adaptive_avg_pool2d``
        (no parameters), ``classifier`` (``nn.Sequential(Dropout, Linear)``) and ``last_channel``.

    Example:
        >>> import torch
        >>> model = mobilenet_v2().eval()
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> model.last_channel
        1280

    References:
        Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.
    """
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, dropout=dropout)
