"""MobileNetV2 (32x32 variant) and the benchmark MLP: shapes, parameter count, modes, tutorial names."""

import pytest
import torch
from torch import nn

from dualmode.apps.models import MobileNetV2, mlp, mobilenet_v2

# torchvision's ImageNet MobileNetV2 (width 1.0, 1000 classes) has 3,504,872 parameters, the figure in
# its weights table (and the paper's "3.4M"). Its classifier is Linear(1280, 1000): 1,281,000 of them.
# With a 10-class head: 3,504,872 - 1,281,000 + (1280 * 10 + 10) = 2,236,682. The CIFAR variant only
# changes strides, which hold no parameters. `_count_by_hand` below re-derives it layer by layer.
PUBLISHED_IMAGENET_PARAMS = 3_504_872
EXPECTED_PARAMS_10_CLASSES = PUBLISHED_IMAGENET_PARAMS - (1280 * 1000 + 1000) + (1280 * 10 + 10)


def _count_by_hand(num_classes=10):
    """Parameters of MobileNetV2 at width 1.0 from the paper's table 2, without building a model."""
    def conv_bn(cin, cout, k=1, groups=1):  # bias-free conv + BatchNorm (weight and bias)
        return cin // groups * cout * k * k + 2 * cout

    total, cin = conv_bn(3, 32, k=3), 32
    for t, c, n in ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)):
        for _ in range(n):
            hidden = cin * t
            total += (conv_bn(cin, hidden) if t != 1 else 0) + conv_bn(hidden, hidden, k=3, groups=hidden)
            total += conv_bn(hidden, c)
            cin = c
    total += conv_bn(cin, 1280)
    return total + 1280 * num_classes + num_classes


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_is_the_published_one():
    assert EXPECTED_PARAMS_10_CLASSES == 2_236_682
    assert _count_by_hand() == EXPECTED_PARAMS_10_CLASSES
    assert _count(mobilenet_v2()) == EXPECTED_PARAMS_10_CLASSES
    assert _count(mobilenet_v2(num_classes=1000)) == PUBLISHED_IMAGENET_PARAMS


@pytest.mark.parametrize("width_mult, last_channel", [(1.0, 1280), (0.5, 1280), (1.4, 1792)])
def test_output_shapes(width_mult, last_channel):
    model = mobilenet_v2(width_mult=width_mult).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.last_channel == last_channel
    # The CIFAR strides leave a 4x4 map (32 / 8), not the ImageNet network's 1x1.
    assert model.features(x).shape == (2, last_channel, 4, 4)
    assert model(x).shape == (2, 10)


def test_narrower_model_has_fewer_parameters():
    assert _count(mobilenet_v2(width_mult=0.5)) < _count(mobilenet_v2())


def test_tutorial_names_exist():
    model = mobilenet_v2(num_classes=10, dropout=0.2)
    assert isinstance(model, MobileNetV2)
    assert isinstance(model.features, nn.Sequential)
    assert isinstance(model.adaptive_avg_pool2d, nn.AdaptiveAvgPool2d)
    assert model.adaptive_avg_pool2d.output_size == (1, 1)
    assert list(model.adaptive_avg_pool2d.parameters()) == []  # the tutorial still gives it a group
    dropout, linear = model.classifier
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.2
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (model.last_channel, 10)
    # The three groups of the tutorial cover every parameter exactly once.
    grouped = [*model.features.parameters(), *model.adaptive_avg_pool2d.parameters(), *model.classifier.parameters()]
    assert len(grouped) == len(list(model.parameters()))
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}


def _running_means(model):
    return [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_batchnorm_statistics_update_only_in_train_mode():
    torch.manual_seed(0)
    model = mobilenet_v2(width_mult=0.5)
    x = torch.randn(4, 3, 32, 32)
    before = _running_means(model)
    model.eval()
    with torch.no_grad():
        model(x)
    assert all(torch.equal(a, b) for a, b in zip(before, _running_means(model)))
    model.train()
    with torch.no_grad():
        model(x)
    assert not torch.equal(before[0], _running_means(model)[0])


def test_eval_is_deterministic_and_dropout_acts_only_in_train():
    torch.manual_seed(0)
    model = mobilenet_v2(width_mult=0.5, dropout=0.5)
    features = torch.randn(8, model.last_channel)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(torch.ones(2, 3, 32, 32)), model(torch.ones(2, 3, 32, 32)))
        assert torch.equal(model.classifier(features), model.classifier(features))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model.classifier(features), model.classifier(features))


def test_initialisation_follows_the_reference():
    model = mobilenet_v2()
    linear = model.classifier[1]
    assert torch.count_nonzero(linear.bias) == 0
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.05)
    first_bn = model.features[0][1]
    assert torch.equal(first_bn.weight, torch.ones_like(first_bn.weight))
    # kaiming normal, fan_out: std = sqrt(2 / (out_channels * k * k)) = sqrt(2 / (32 * 9)) for the stem.
    assert model.features[0][0].weight.std().item() == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.15)


def test_gradients_reach_every_parameter():
    model = mobilenet_v2(width_mult=0.5)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"width_mult": 0.0}, "width_mult"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mobilenet_v2(**kwargs)


def test_mlp_shapes_and_size():
    model = mlp()
    assert isinstance(model[0], nn.Flatten)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # 3072-512-512-10: weights plus biases of three Linear layers.
    assert _count(model) == 3072 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert mlp(in_features=8, hidden=4, num_classes=3, depth=0)(torch.randn(5, 8)).shape == (5, 3)
    assert sum(isinstance(m, nn.Linear) for m in mlp(depth=3)) == 4


@pytest.mark.parametrize("name", ["in_features", "hidden", "num_classes", "depth"])
def test_mlp_bad_arguments_are_named(name):
    with pytest.raises(ValueError, match=name):
        mlp(**{name: -1})


def test_docstring_examples_run():
    import doctest
    import importlib

    # By module path: the package re-exports functions with the same names as these modules.
    for name in ("dualmode.apps.models.mobilenet_v2", "dualmode.apps.models.mlp"):
        result = doctest.testmod(importlib.import_module(name))
        assert result.failed == 0 and result.attempted > 0
