"""param_groups: selectors, first match wins, defaults, frozen and tied parameters, splits, the seed case."""

import collections
import copy

import pytest
import torch
from torch import nn

from dualmode.groups.resolver import param_groups

# (selector built from the seed network, names of the parameters it must select, in model order)
SELECTORS = {
    "module": (lambda m: m.fc2, ["fc2.weight", "fc2.bias"]),
    "parameter": (lambda m: m.fc2.bias, ["fc2.bias"]),
    "list of parameters": (lambda m: [m.fc2.bias, m.conv1.weight], ["conv1.weight", "fc2.bias"]),
    "tuple of modules": (lambda m: (m.fc2, m.bn1), ["bn1.weight", "bn1.bias", "fc2.weight", "fc2.bias"]),
    "mixed list": (lambda m: [m.fc2, m.conv1.bias], ["conv1.bias", "fc2.weight", "fc2.bias"]),
    "generator": (lambda m: m.fc2.parameters(), ["fc2.weight", "fc2.bias"]),
    "filter": (lambda m: filter(lambda p: p.ndim == 1, m.fc1.parameters()), ["fc1.bias"]),
    "glob": (lambda m: "fc2.*", ["fc2.weight", "fc2.bias"]),
    "glob suffix": (lambda m: "*.bias", ["conv1.bias", "bn1.bias", "fc1.bias", "fc2.bias"]),
    "list of globs": (lambda m: ["fc2.w*", "bn1.bias"], ["bn1.bias", "fc2.weight"]),
    "callable": (lambda m: lambda name, p: p.ndim == 2, ["fc1.weight", "fc2.weight"]),
}


def names_of(groups):
    return [g["names"] for g in groups]


@pytest.mark.parametrize("kind", SELECTORS)
def test_each_selector_kind_selects_its_parameters(seed_net, kind):
    build, expected = SELECTORS[kind]
    groups = param_groups(seed_net, [{"params": build(seed_net), "lr": 0.5}])
    by_name = dict(seed_net.named_parameters())
    assert groups[0]["names"] == expected
    assert all(p is by_name[n] for p, n in zip(groups[0]["params"], expected))
    assert groups[0]["lr"] == 0.5
    assert groups[1]["rule"] == "default"
    assert groups[1]["names"] == [n for n in by_name if n not in expected]


def test_first_match_wins(seed_net):
    groups = param_groups(seed_net, [{"params": "fc2.bias"}, {"params": "*.bias"}, {"params": seed_net.fc2}])
    assert names_of(groups) == [["fc2.bias"], ["conv1.bias", "bn1.bias", "fc1.bias"], ["fc2.weight"],
                                ["conv1.weight", "bn1.weight", "fc1.weight"]]
    assert [g["rule"] for g in groups] == [0, 1, 2, "default"]


def test_one_group_per_rule_in_rule_order_even_when_empty(seed_net):
    rules = [{"params": "fc2.*", "lr": 1.0}, {"params": "fc9.*", "lr": 2.0}, {"params": "*.bias", "lr": 3.0}]
    with pytest.warns(UserWarning, match=r"rule 1 \('fc9\.\*'\) selects no parameter"):
        groups = param_groups(seed_net, rules)
    assert [g["lr"] for g in groups[:3]] == [1.0, 2.0, 3.0]
    assert groups[1]["params"] == [] and groups[1]["names"] == [] and groups[1]["lr_scale"] == 1.0
    assert groups[3]["rule"] == "default"


def test_default_group_only_when_something_is_left(seed_net):
    assert [g["rule"] for g in param_groups(seed_net, [{"params": "*"}], default={"lr": 9.0})] == [0]
    rest = param_groups(seed_net, [{"params": "fc*"}], default={"lr": 9.0, "lr_scale": 0.5})[-1]
    assert rest["rule"] == "default" and rest["lr"] == 9.0 and rest["lr_scale"] == 0.5
    assert rest["names"] == ["conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"]
    bare = param_groups(seed_net)
    assert len(bare) == 1 and set(bare[0]) == {"params", "names", "lr_scale", "rule"}


def test_every_group_has_names_and_lr_scale_and_no_torch_param_names(seed_net):
    groups = param_groups(seed_net, [{"params": "fc2.*", "lr_scale": 3}, {"params": "bn1.*"}],
                          no_weight_decay=True, layer_decay=0.9)
    named = {id(p): n for n, p in seed_net.named_parameters()}
    for group in groups:
        assert "param_names" not in group
        assert isinstance(group["lr_scale"], float)
        assert group["names"] == [named[id(p)] for p in group["params"]]


def test_frozen_parameters_go_to_no_group(seed_net):
    seed_net.conv1.requires_grad_(False)
    groups = param_groups(seed_net, [{"params": seed_net.parameters()}])
    assert names_of(groups) == [["bn1.weight", "bn1.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]]


def test_rule_with_only_frozen_parameters_is_empty_and_says_so(seed_net):
    seed_net.conv1.requires_grad_(False)
    with pytest.warns(UserWarning) as caught:
        groups = param_groups(seed_net, [{"params": seed_net.conv1}, {"params": seed_net.conv1.weight}])
    assert [str(w.message).split("; its group")[0] for w in caught] == [
        "rule 0 (module 'conv1') selects no trainable parameter; frozen (requires_grad=False): 'conv1.weight', "
        "'conv1.bias'",
        "rule 1 (parameter 'conv1.weight') selects no trainable parameter; frozen (requires_grad=False): "
        "'conv1.weight'"]
    assert names_of(groups)[:2] == [[], []]
    assert "conv1.weight" not in sum(names_of(groups), [])


def test_hyperparameters_are_copied_and_inputs_left_alone(seed_net):
    rules = [{"params": "fc2.*", "lr_scale": 2.0, "betas": (0.8, 0.9), "weight_decay": 0.1}]
    default = {"lr": 0.3}
    before = copy.deepcopy((rules, default))
    groups = param_groups(seed_net, rules, default=default, no_weight_decay=True)
    assert (rules, default) == before
    assert [set(g) - {"params", "names", "lr_scale", "rule"} for g in groups] == [
        {"betas", "weight_decay"}, {"betas", "weight_decay"}, {"lr"}, {"lr", "weight_decay"}]
    groups[0]["betas"] = None
    assert rules[0]["betas"] == (0.8, 0.9) and groups[1]["betas"] == (0.8, 0.9)


def test_no_weight_decay_true_zeroes_one_dimensional_parameters(seed_net):
    groups = param_groups(seed_net, [{"params": "fc2.*", "weight_decay": 0.1}], no_weight_decay=True)
    assert [(g["names"], g.get("weight_decay")) for g in groups] == [
        (["fc2.weight"], 0.1), (["fc2.bias"], 0.0),
        (["conv1.weight", "fc1.weight"], None), (["conv1.bias", "bn1.weight", "bn1.bias", "fc1.bias"], 0.0)]


@pytest.mark.parametrize("globs", [["bn1.*"], "bn1.*", ("bn1.weight", "bn1.bias")])
def test_no_weight_decay_globs_zero_matching_names(seed_net, globs):
    groups = param_groups(seed_net, no_weight_decay=globs)
    assert [(g["names"], g.get("weight_decay")) for g in groups] == [
        (["conv1.weight", "conv1.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], None),
        (["bn1.weight", "bn1.bias"], 0.0)]


def test_layer_decay_scales_by_top_level_child_and_orders_pieces(seed_net):
    groups = param_groups(seed_net, [{"params": "fc2.*", "lr_scale": 10.0}], layer_decay=0.5, no_weight_decay=True)
    assert [(g["names"], g["lr_scale"], g.get("weight_decay"), g["rule"]) for g in groups] == [
        (["fc2.weight"], 10.0, None, 0), (["fc2.bias"], 10.0, 0.0, 0),
        (["conv1.weight"], 0.125, None, "default"), (["conv1.bias"], 0.125, 0.0, "default"),
        (["bn1.weight", "bn1.bias"], 0.25, 0.0, "default"),
        (["fc1.weight"], 0.5, None, "default"), (["fc1.bias"], 0.5, 0.0, "default")]


def test_layer_decay_counts_only_children_with_trainable_parameters():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    model[2].requires_grad_(False)
    groups = param_groups(model, layer_decay=0.1)
    assert [(g["names"], pytest.approx(g["lr_scale"])) for g in groups] == [
        (["0.weight", "0.bias"], 0.01), (["3.weight", "3.bias"], 0.1), (["4.weight", "4.bias"], 1.0)]


def test_explicit_layers_first_match_and_catch_all(seed_net):
    layers = [seed_net.conv1, ["bn1.*", "fc1.bias"], "*"]
    groups = param_groups(seed_net, layer_decay=0.5, layers=layers)
    assert [(g["names"], g["lr_scale"]) for g in groups] == [
        (["conv1.weight", "conv1.bias"], 0.25), (["bn1.weight", "bn1.bias", "fc1.bias"], 0.5),
        (["fc1.weight", "fc2.weight", "fc2.bias"], 1.0)]


def test_tied_parameter_appears_once_under_its_first_name(tied_net):
    groups = param_groups(tied_net)
    assert names_of(groups) == [["embed.weight", "mid.weight", "mid.bias", "head.bias"]]
    torch.optim.SGD(groups, lr=0.1)  # torch raises on a parameter present twice


@pytest.mark.parametrize("selector", [lambda m: "head.*", lambda m: m.head, lambda m: [m.head.weight, m.embed.weight,
                                                                                          m.head.bias]])
def test_tied_parameter_is_selected_under_any_of_its_names(tied_net, selector):
    groups = param_groups(tied_net, [{"params": selector(tied_net), "lr_scale": 10.0}])
    assert names_of(groups) == [["embed.weight", "head.bias"], ["mid.weight", "mid.bias"]]


def test_module_registered_twice_counts_once():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(collections.OrderedDict(a=shared, mid=nn.Linear(2, 2), b=shared))
    assert [g["names"] for g in param_groups(model, [{"params": "b.*"}])] == [["a.weight", "a.bias"],
                                                                              ["mid.weight", "mid.bias"]]
    assert [g["lr_scale"] for g in param_groups(model, layer_decay=0.5)] == [0.5, 1.0]  # 'b' adds no layer


def test_tied_parameter_layer_is_that_of_its_first_name(tied_net):
    groups = param_groups(tied_net, layer_decay=0.5)
    assert [(g["names"], g["lr_scale"]) for g in groups] == [
        (["embed.weight"], 0.25), (["mid.weight", "mid.bias"], 0.5), (["head.bias"], 1.0)]


# The seed case: fc2.bias 20x lr and no weight decay, the other biases 2x and no weight decay, fc2.weight 10x,
# everything else 1x, in four rules.
SEED_RULES = [
    {"params": "fc2.bias", "lr_scale": 20.0, "weight_decay": 0.0},
    {"params": "*.bias", "lr_scale": 2.0, "weight_decay": 0.0},
    {"params": "fc2.weight", "lr_scale": 10.0},
    {"params": "*"},
]
SEED_SCALE = {"fc2.bias": 20, "conv1.bias": 2, "bn1.bias": 2, "fc1.bias": 2, "fc2.weight": 10,
              "conv1.weight": 1, "bn1.weight": 1, "fc1.weight": 1}
LR, WD = 0.01, 5e-4


def seed_step_inputs(model):
    loss = model(torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(1))).square().mean()
    loss.backward()
    return {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}


def expected_after_one_step(before, lr_of):
    """p - lr * (grad + weight_decay * p); the first SGD momentum step equals the plain one."""
    return {n: p - lr_of[n] * (g + (0.0 if n.endswith("bias") else WD) * p) for n, (p, g) in before.items()}


def test_seed_case_effective_learning_rates(seed_net):
    optimizer = torch.optim.SGD(param_groups(seed_net, SEED_RULES), lr=LR, momentum=0.9, weight_decay=WD)
    assert len(optimizer.param_groups) == 4
    seen = {}
    for group in optimizer.param_groups:
        for name in group["names"]:
            seen[name] = (group["lr"] * group["lr_scale"], group["weight_decay"])
    expected = {n: (pytest.approx(LR * s), 0.0 if n.endswith("bias") else WD) for n, s in SEED_SCALE.items()}
    assert seen == expected


def test_seed_case_step_with_effective_lr_matches_hand_computation(seed_net):
    optimizer = torch.optim.SGD(param_groups(seed_net, SEED_RULES), lr=LR, momentum=0.9, weight_decay=WD)
    before = seed_step_inputs(seed_net)
    for group in optimizer.param_groups:  # the effective-lr rule: lr x lr_scale for the update
        group["lr"] *= group["lr_scale"]
    optimizer.step()
    expected = expected_after_one_step(before, {n: LR * s for n, s in SEED_SCALE.items()})
    for name, p in seed_net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-7)


def test_plain_torch_optim_takes_the_groups_and_uses_lr_alone(seed_net):
    """torch.optim ignores lr_scale: a plain step moves every parameter by group['lr'] only."""
    optimizer = torch.optim.SGD(param_groups(seed_net, SEED_RULES), lr=LR, momentum=0.9, weight_decay=WD)
    before = seed_step_inputs(seed_net)
    optimizer.step()
    expected = expected_after_one_step(before, dict.fromkeys(SEED_SCALE, LR))
    for name, p in seed_net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-7)


def test_seed_case_with_absolute_lr_needs_no_lr_scale(seed_net):
    rules = [{"params": "fc2.bias", "lr": 20 * LR, "weight_decay": 0.0},
             {"params": "*.bias", "lr": 2 * LR, "weight_decay": 0.0},
             {"params": "fc2.weight", "lr": 10 * LR},
             {"params": "*", "lr": LR}]
    optimizer = torch.optim.SGD(param_groups(seed_net, rules), lr=LR, momentum=0.9, weight_decay=WD)
    before = seed_step_inputs(seed_net)
    optimizer.step()
    expected = expected_after_one_step(before, {n: LR * s for n, s in SEED_SCALE.items()})
    for name, p in seed_net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-7)
