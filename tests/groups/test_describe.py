"""describe(): the table of groups for an optimizer, a list of groups or a TrainGraph-like object."""

import types

import pytest
import torch
from torch import nn

import dualmode as dm
from dualmode.groups.describe import describe
from dualmode.groups.resolver import param_groups

SEED_RULES = [
    {"params": "fc2.bias", "lr_scale": 20.0, "weight_decay": 0.0},
    {"params": "*.bias", "lr_scale": 2.0, "weight_decay": 0.0},
    {"params": "fc2.weight", "lr_scale": 10.0},
    {"params": "*"},
]

SEED_TABLE = """\
SGD with 4 param groups
group  rule  tensors  elements    lr  lr_scale  effective lr  weight decay  names
0      0           1         3  0.01        20           0.2             0  fc2.bias
1      1           2        12  0.01         2          0.02             0  bn1.bias, fc1.bias
2      2           1        24  0.01        10           0.1        0.0005  fc2.weight
3      3           2       516  0.01         1          0.01        0.0005  bn1.weight, fc1.weight
6 tensors, 555 elements in 4 groups
frozen (requires_grad=False): 2 tensors, 40 elements: conv1.weight, conv1.bias"""


def seed_optimizer(model):
    return torch.optim.SGD(param_groups(model, SEED_RULES), lr=0.01, momentum=0.9, weight_decay=5e-4)


def test_optimizer_table_with_frozen_section(seed_net):
    seed_net.conv1.requires_grad_(False)
    assert describe(seed_optimizer(seed_net), model=seed_net) == SEED_TABLE


def test_groups_without_lr_show_the_scale_of_lr(seed_net):
    lines = describe(param_groups(seed_net, SEED_RULES)).splitlines()
    assert lines[0].split() == ["group", "rule", "tensors", "elements", "lr", "lr_scale", "effective", "lr",
                                "weight", "decay", "names"]
    assert lines[1].split() == ["0", "0", "1", "3", "-", "20", "20", "x", "lr", "0", "fc2.bias"]
    assert lines[4].split() == ["3", "3", "3", "552", "-", "1", "1", "x", "lr", "-", "conv1.weight,", "bn1.weight,",
                                "fc1.weight"]
    assert lines[-1] == "8 tensors, 595 elements in 4 groups ('-': not set in the group)"


def test_more_than_three_names_are_cut(seed_net):
    last_row = describe(param_groups(seed_net, no_weight_decay=True)).splitlines()[-2]
    assert last_row.split()[:3] == ["1", "default", "5"]
    assert last_row.endswith("  conv1.bias, bn1.weight, bn1.bias, ... (+2)")


def test_hand_written_groups_names_from_model_or_question_mark(seed_net):
    groups = [{"params": seed_net.fc1.weight, "lr": torch.tensor(0.1)},
              {"params": [torch.randn(3, 64, 64), seed_net.fc2.bias], "lr": 0.5, "lr_scale": 4},
              {"params": seed_net.conv1.parameters()},
              {"params": []}]
    lines = describe(groups, model=seed_net).splitlines()
    assert [line.split() for line in lines[1:5]] == [
        ["0", "-", "1", "512", "0.1", "1", "0.1", "-", "fc1.weight"],
        ["1", "-", "2", "12,291", "0.5", "4", "2", "-", "?,", "fc2.bias"],
        ["2", "-", "?", "?", "-", "1", "1", "x", "lr", "-", "?"],
        ["3", "-", "0", "0", "-", "1", "1", "x", "lr", "-", "(empty)"]]
    assert lines[5] == ("3 tensors, 12,803 elements in 4 groups ('?': a one-shot iterator, not read; "
                        "'-': not set in the group)")
    assert lines[6:] == ["frozen (requires_grad=False): none",
                         "not parameters of the model: group 1: tensor of shape (3, 64, 64)"]
    assert [line.split()[-1] for line in describe(groups[:2]).splitlines()[1:3]] == ["?", "?"]  # no model


def test_parameters_in_no_group_are_listed(seed_net):
    text = describe([{"params": list(seed_net.fc2.parameters()), "lr": 0.1}], model=seed_net)
    assert text.splitlines()[-1] == ("trainable but in no group: conv1.weight, conv1.bias, bn1.weight, "
                                     "bn1.bias, fc1.weight, fc1.bias")


def test_long_frozen_list_is_cut():
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(7)]).requires_grad_(False)
    assert describe([], model=model).splitlines()[-1] == (
        "frozen (requires_grad=False): 14 tensors, 14 elements: 0.weight, 0.bias, 1.weight, 1.bias, 2.weight, "
        "2.bias, 3.weight, 3.bias, 4.weight, 4.bias, ... (+4)")


def test_train_graph_like_object_shows_mode_and_optimizer(seed_net):
    seed_net.conv1.requires_grad_(False)
    step = types.SimpleNamespace(mode="graph", optimizer=seed_optimizer(seed_net))
    assert describe(step, model=seed_net) == "mode: graph\n" + SEED_TABLE


def test_evaluation_graph_has_no_optimizer(seed_net):
    step = types.SimpleNamespace(mode="eager", optimizer=None)
    assert describe(step) == "mode: eager\nno optimizer (evaluation graph)"
    assert describe(step, model=seed_net).splitlines()[-1] == "frozen (requires_grad=False): none"


def test_a_real_train_graph(seed_net):
    class Step(dm.TrainGraph):
        def __init__(self, optimizer=None):
            super().__init__(mode="eager")
            self.model = seed_net
            if optimizer is not None:
                self.add_optimizer(optimizer)

    seed_net.conv1.requires_grad_(False)
    assert describe(Step(seed_optimizer(seed_net)), model=seed_net) == "mode: eager\n" + SEED_TABLE
    assert describe(Step()) == "mode: eager\nno optimizer (evaluation graph)"


@pytest.mark.parametrize("thing, message", [
    (nn.Linear(2, 2), r"describe takes an optimizer, a list of param groups or a TrainGraph, got Linear"),
    ({"params": []}, r"describe takes .* got dict"),
    ([{"params": []}, 3], r"group 1 is a int, not a dict"),
])
def test_describe_rejects_other_objects(thing, message):
    with pytest.raises(TypeError, match=message):
        describe(thing)


def test_describe_model_must_be_a_module(seed_net):
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got generator"):
        describe([], model=seed_net.parameters())
