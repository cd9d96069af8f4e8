"""Groups from param_groups work unchanged with torch.optim: steps, a later add_param_group, state_dict."""

import copy

import pytest
import torch

from dualmode.groups.describe import describe
from dualmode.groups.resolver import param_groups

OPTIMIZERS = {
    "SGD": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "Adam": lambda groups: torch.optim.Adam(groups, lr=1e-3),
    "AdamW": lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.01),
    "RMSprop": lambda groups: torch.optim.RMSprop(groups, lr=1e-3, momentum=0.9, centered=True),
    "Adagrad": lambda groups: torch.optim.Adagrad(groups, lr=0.1, weight_decay=1e-4),
}
RULES = [{"params": "fc2.*", "lr_scale": 10.0, "lr": 0.05}, {"params": "missing.*"}, {"params": "*.bias"}]


def fine_tuning_optimizer(model, make):
    """fc1 starts frozen; the groups include an empty one, no-decay pieces and layer-decayed pieces."""
    model.fc1.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"rule 1 \('missing\.\*'\)"):
        groups = param_groups(model, RULES, default={"lr_scale": 0.5}, no_weight_decay=True, layer_decay=0.8)
    return make(groups)


def unfreeze_fc1(model, optimizer):
    model.fc1.requires_grad_(True)
    optimizer.add_param_group({"params": list(model.fc1.parameters())})  # plain torch, no names, no lr_scale


def train_step(model, optimizer):
    loss = model(torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(2))).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_steps_add_param_group_and_state_dict_round_trip(seed_net, name):
    make = OPTIMIZERS[name]
    fresh = copy.deepcopy(seed_net)
    optimizer = fine_tuning_optimizer(seed_net, make)
    train_step(seed_net, optimizer)
    unfreeze_fc1(seed_net, optimizer)
    train_step(seed_net, optimizer)
    assert optimizer.param_groups[-1]["params"][0] is seed_net.fc1.weight

    twin = fine_tuning_optimizer(fresh, make)
    unfreeze_fc1(fresh, twin)
    fresh.load_state_dict(seed_net.state_dict())
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # torch's load keeps the same state tensors
    for mine, theirs in zip(optimizer.param_groups, twin.param_groups):
        assert {k: v for k, v in mine.items() if k != "params"} == {k: v for k, v in theirs.items() if k != "params"}
    mine_state, their_state = optimizer.state_dict()["state"], twin.state_dict()["state"]
    assert mine_state.keys() == their_state.keys() and mine_state
    for index, state in mine_state.items():
        for key, value in state.items():
            torch.testing.assert_close(their_state[index][key], value, rtol=0, atol=0)

    train_step(seed_net, optimizer)
    train_step(fresh, twin)
    for a, b in zip(seed_net.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_describe_after_a_plain_add_param_group(seed_net):
    optimizer = fine_tuning_optimizer(seed_net, OPTIMIZERS["SGD"])
    unfreeze_fc1(seed_net, optimizer)
    with_model, alone = describe(optimizer, model=seed_net).splitlines(), describe(optimizer).splitlines()
    assert with_model[-3].split() == ["7", "-", "2", "520", "0.1", "1", "0.1", "0.0001", "fc1.weight,", "fc1.bias"]
    assert alone[-2].endswith("?, ?") and alone[-1] == "8 tensors, 595 elements in 8 groups"
