"""The tutorial's graph-mode groups on MobileNetV2: one SGD step moves each parameter by -lr x lr_scale x grad."""

import copy

import pytest
import torch

import dualmode as dm
from dualmode.apps.models import mobilenet_v2
from tests.steps import FAST


class TutorialStep(dm.TrainGraph):
    def __init__(self, model, optimizer):
        super().__init__(mode="graph", config=dm.StepConfig(compile_options=dict(FAST)))
        self.model = model
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.add_optimizer(optimizer)

    def build(self, x, y):
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        return loss


def test_tutorial_lr_scales_move_each_parameter_by_lr_times_scale_times_grad():
    torch.manual_seed(0)
    model = mobilenet_v2(width_mult=0.25, dropout=0.0).double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(reference(x), y).backward()

    with pytest.warns(UserWarning, match="rule 1.*adaptive_avg_pool2d"):  # the tutorial's empty group
        groups = dm.param_groups(model, [
            {"params": model.features, "lr_scale": 0.9},
            {"params": model.adaptive_avg_pool2d, "lr_scale": 0.8},
            {"params": model.classifier, "lr_scale": 0.7},
        ])
    step = TutorialStep(model, torch.optim.SGD(groups, lr=1e-3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(x, y)
    assert step.compile_count == 1
    checked = 0
    for group, scale in zip(groups, (0.9, 0.8, 0.7)):
        assert group["lr_scale"] == scale
        for name in group["names"]:
            expected = before[name] - 1e-3 * scale * reference.get_parameter(name).grad
            torch.testing.assert_close(model.get_parameter(name).detach(), expected, rtol=1e-9, atol=1e-12)
            checked += 1
    assert checked == len(before)
