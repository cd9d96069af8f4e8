"""param_groups on bad input: a table of cases, each with the error or warning it must give and its message."""

import copy

import pytest
import torch
from torch import nn

from dualmode.groups.resolver import param_groups

NOT_FINITE_POSITIVE = [0, -1.0, float("nan"), float("inf"), "2", True, None, torch.tensor(2.0)]

# id -> (keyword arguments built from the seed network, exception, regex its message must match)
ERRORS = {
    "random tensor": (lambda m: {"rules": [{"params": torch.randn(3, 64, 64)}]}, ValueError,
                      r"rule 0 \(tensor of shape \(3, 64, 64\)\): the tensor is not a parameter of the model"),
    "random tensor in a list": (
        lambda m: {"rules": [{"params": "fc2.*"}, {"params": [m.fc1.weight, torch.randn(3, 64, 64)]}]}, ValueError,
        r"rule 1 \(list of 2 items\): element 1 \(a tensor of shape \(3, 64, 64\)\) is not a parameter"),
    "detached copy": (lambda m: {"rules": [{"params": m.fc1.weight.detach()}]}, ValueError,
                      r"rule 0 \(tensor of shape \(8, 64\)\): the tensor is not a parameter of the model"),
    "buffer": (lambda m: {"rules": [{"params": m.bn1.running_mean}]}, ValueError,
               r"rule 0 .*not a parameter of the model \(it is the model's buffer 'bn1.running_mean'\)"),
    "module of another model": (lambda m: {"rules": [{"params": nn.Linear(2, 3)}]}, ValueError,
                                r"rule 0 \(Linear module\): its parameter 'weight' of shape \(3, 2\) is not a param"),
    "module of another model in a list": (
        lambda m: {"rules": [{"params": [m.fc1, nn.Linear(2, 3)]}]}, ValueError,
        r"rule 0 \(list of 2 items\): element 1's parameter 'weight' is not a parameter of the model"),
    "set": (lambda m: {"rules": [{"params": "fc2.*"}, {"params": set(m.parameters())}]}, TypeError,
            r"rule 1: a set is unordered"),
    "frozenset": (lambda m: {"rules": [{"params": frozenset(["fc2.*"])}]}, TypeError, r"rule 0: a set is unordered"),
    "dict": (lambda m: {"rules": [{"params": dict(m.named_parameters())}]}, TypeError,
             r"rule 0: a dict is not a selector"),
    "int": (lambda m: {"rules": [{"params": 3}]}, TypeError, r"rule 0: unknown selector type int"),
    "None": (lambda m: {"rules": [{"params": None}]}, TypeError, r"rule 0: unknown selector type NoneType"),
    "class": (lambda m: {"rules": [{"params": nn.Linear}]}, TypeError, r"rule 0: the class Linear is not a selector"),
    "globs mixed with parameters": (lambda m: {"rules": [{"params": ["fc2.*", m.fc1.weight]}]}, TypeError,
                                    r"rule 0 \(list of 2 items\): element 0 is a str"),
    "named_parameters": (lambda m: {"rules": [{"params": m.named_parameters()}]}, TypeError,
                         r"rule 0 \(generator of 8 items\): element 0 is a tuple \(from named_parameters\(\)\?"),
    "callable returning None": (lambda m: {"rules": [{"params": lambda name, p: None}]}, TypeError,
                                r"rule 0 \(callable <lambda>\): returned NoneType for 'conv1.weight'"),
    "callable returning a tensor": (lambda m: {"rules": [{"params": lambda name, p: p.ndim == torch.tensor(1)}]},
                                    TypeError, r"rule 0 \(callable <lambda>\): returned Tensor for 'conv1.weight'"),
    "rules is a dict": (lambda m: {"rules": {"params": "*"}}, TypeError, r"rules is a dict; pass a list of dicts"),
    "rules is a string": (lambda m: {"rules": "fc2.*"}, TypeError, r"rules must be a list of dicts, got str"),
    "rule is a parameter": (lambda m: {"rules": [m.fc1.weight]}, TypeError,
                            r"rule 0 is a Parameter, not a dict with a 'params' key"),
    "rule without params": (lambda m: {"rules": [{"params": "*"}, {"lr": 0.1}]}, ValueError,
                            r"rule 1 has no 'params' key"),
    "names in a rule": (lambda m: {"rules": [{"params": "*", "names": ["a"]}]}, ValueError,
                        r"rule 0: remove the key 'names'"),
    "torch's param_names": (lambda m: {"rules": [{"params": "*", "param_names": ["a"]}]}, ValueError,
                            r"rule 0: remove the key 'param_names' \(it is torch's key"),
    "default with params": (lambda m: {"default": {"params": "*"}}, ValueError, r"default holds hyperparameters only"),
    "default not a dict": (lambda m: {"default": 0.1}, TypeError, r"default must be a dict, got float"),
    "no_weight_decay number": (lambda m: {"no_weight_decay": 1}, TypeError, r"no_weight_decay must be True, False"),
    "no_weight_decay mixed list": (lambda m: {"no_weight_decay": ["*.bias", m.fc1.bias]}, TypeError,
                                   r"no_weight_decay must be True, False, a glob or a list of globs"),
    "layers without layer_decay": (lambda m: {"layers": ["*"]}, ValueError, r"layers= is used only by layer_decay"),
    "layers not a list": (lambda m: {"layer_decay": 0.5, "layers": "*"}, TypeError, r"layers must be a list"),
    "parameter in no layer": (lambda m: {"layer_decay": 0.5, "layers": [m.conv1, "bn1.*"]}, ValueError,
                              r"layers: trainable parameters 'fc1.weight', 'fc1.bias', 'fc2.weight' and 1 more are "
                              r"in no layer"),
    "strict not a bool": (lambda m: {"strict": "yes"}, TypeError, r"strict must be True or False"),
}
ERRORS.update({
    f"lr_scale {value!r}": (lambda m, v=value: {"rules": [{"params": "*", "lr_scale": v}]}, ValueError,
                            r"rule 0: lr_scale must be a finite positive number, got ")
    for value in NOT_FINITE_POSITIVE})
ERRORS.update({
    f"default lr_scale {value!r}": (lambda m, v=value: {"default": {"lr_scale": v}}, ValueError,
                                    r"default: lr_scale must be a finite positive number")
    for value in NOT_FINITE_POSITIVE[:4]})
ERRORS.update({
    f"layer_decay {value!r}": (lambda m, v=value: {"layer_decay": v}, ValueError,
                               r"layer_decay must be a finite positive number")
    for value in NOT_FINITE_POSITIVE if value is not None})


@pytest.mark.parametrize("case", ERRORS)
def test_bad_input_raises_naming_the_culprit(seed_net, case):
    build, error, message = ERRORS[case]
    kwargs = build(seed_net)
    rules = kwargs.get("rules")
    before = [dict(r) if isinstance(r, dict) else r for r in rules] if isinstance(rules, list) else None
    with pytest.raises(error, match=message):
        param_groups(seed_net, **kwargs)
    if before is not None:  # nothing half-built: the caller's list and dicts are as they were
        assert [dict(r) if isinstance(r, dict) else r for r in rules] == before


def test_model_must_be_a_module(seed_net):
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got list"):
        param_groups(list(seed_net.parameters()))


def test_layer_decay_refuses_parameters_on_the_model_itself():
    with pytest.raises(ValueError, match=r"layer_decay: parameter 'weight' is registered on the model itself"):
        param_groups(nn.Linear(2, 2), layer_decay=0.5)


def test_error_in_a_selector_callable_says_which_rule_and_name(seed_net):
    def picky(name, p):
        return {"conv1.weight": True}[name]

    with pytest.raises(KeyError) as caught:
        param_groups(seed_net, [{"params": "*.bias"}, {"params": picky}])
    assert caught.value.__notes__ == ["while rule 1's selector (callable picky) "
                                      "looked at 'conv1.bias'"]


def test_error_after_an_empty_rule_gives_no_warning_and_no_groups(seed_net):
    rules = [{"params": "fc9.*"}, {"params": "fc2.*"}, {"params": torch.randn(3, 64, 64)}]
    before = copy.deepcopy(rules[:2])
    with pytest.raises(ValueError, match=r"rule 2 \(tensor of shape \(3, 64, 64\)\)"):  # a warning would fail here
        param_groups(seed_net, rules)
    assert rules[:2] == before


def _spent_generator(m):
    params = m.parameters()
    list(params)
    return params


# id -> (keyword arguments built from the seed network, regex of the one warning (ValueError when strict))
WARNINGS = {
    "spent generator": (lambda m: {"rules": [{"params": _spent_generator(m)}]},
                        r"rule 0 \(generator of 0 items\) selects no parameter: it yielded nothing \(a generator "
                        r"such as model.parameters\(\) can be read only once; pass a list\)"),
    "glob without match": (lambda m: {"rules": [{"params": "fc3.*"}]},
                           r"rule 0 \('fc3\.\*'\) selects no parameter: no parameter name matches \(names look "
                           r"like 'conv1.weight', 'conv1.bias', 'bn1.weight'\)"),
    "module without parameters": (lambda m: {"rules": [{"params": nn.ReLU()}]},
                                  r"rule 0 \(ReLU module\) selects no parameter: the module has no parameters"),
    "empty list": (lambda m: {"rules": [{"params": "fc2.*"}, {"params": []}]},
                   r"rule 1 \(list of 0 items\) selects no parameter: it is empty"),
    "callable always false": (lambda m: {"rules": [{"params": lambda name, p: False}]},
                              r"rule 0 \(callable <lambda>\) selects no parameter: the callable returned False"),
    "all taken by earlier rules": (
        lambda m: {"rules": [{"params": "fc2.*"}, {"params": m.fc2}]},
        r"rule 1 \(module 'fc2'\) selects no trainable parameter; taken by earlier ones \(first match wins\): "
        r"'fc2.weight' \(rule 0\), 'fc2.bias' \(rule 0\)"),
    "glob without match in a list": (lambda m: {"rules": [{"params": ["fc2.*", "fc9.*"]}]},
                                     r"rule 0 \(\['fc2.\*', 'fc9.\*'\]\): glob 'fc9.\*' matches no parameter name"),
    "no_weight_decay glob without match": (lambda m: {"no_weight_decay": ["*.bias", "norm*"]},
                                           r"no_weight_decay: glob 'norm\*' matches no parameter name"),
    "empty layer": (lambda m: {"layer_decay": 0.5, "layers": ["conv1.*", "fc2.*", m.fc2, "*"]},
                    r"layer 2 \(module 'fc2'\) selects no trainable parameter; taken by earlier ones "
                    r"\(first match wins\): 'fc2.weight' \(layer 1\)"),
}


@pytest.mark.parametrize("case", WARNINGS)
def test_selecting_nothing_warns_naming_the_rule(seed_net, case):
    build, message = WARNINGS[case]
    with pytest.warns(UserWarning, match=message):
        param_groups(seed_net, **build(seed_net))


@pytest.mark.parametrize("case", WARNINGS)
def test_selecting_nothing_is_an_error_when_strict(seed_net, case):
    build, message = WARNINGS[case]
    with pytest.raises(ValueError, match=message):
        param_groups(seed_net, **build(seed_net), strict=True)


def test_the_same_generator_in_two_rules(seed_net):
    """The classic: a generator is read by the first rule, the second finds it empty."""
    params = seed_net.fc1.parameters()
    with pytest.warns(UserWarning, match=r"rule 1 \(generator of 0 items\) .* can be read only once") as caught:
        groups = param_groups(seed_net, [{"params": params, "lr_scale": 2.0}, {"params": params}])
    assert str(caught[0].message).endswith("; its group is kept, empty, so that groups line up with the rules")
    assert [g["names"] for g in groups[:2]] == [["fc1.weight", "fc1.bias"], []]


def test_strict_reports_every_problem_at_once(seed_net):
    with pytest.raises(ValueError, match=r"(?s)rule 0 \('a\*'\).*\nrule 2 \('z\*'\)") as caught:
        param_groups(seed_net, [{"params": "a*"}, {"params": "fc*"}, {"params": "z*"}], strict=True)
    assert "its group is kept" not in str(caught.value)
