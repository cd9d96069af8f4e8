"""Properties of param_groups over random rules: a partition of the trainable parameters, first match wins,
and the same input always gives the same groups."""

import fnmatch
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualmode.groups.resolver import param_groups

# The fixtures' models are only read by param_groups, so sharing one across examples is safe.
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
GLOBS = ["*", "*.bias", "*.weight", "fc*", "conv1.*", "bn1.?ias", "nothing.*", "head.*", "embed.*", "mid.*"]
CALLABLES = [lambda name, p: p.ndim == 1, lambda name, p: "1" in name, lambda name, p: False,
             lambda name, p: p.numel() > 10]


def selector_recipes(model):
    """Strategy for a function that builds a fresh selector (so that generators can be built twice)."""
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    modules = [m for _, m in model.named_modules()]
    things = st.lists(st.sampled_from(params + modules), max_size=4)
    return st.one_of(
        st.sampled_from(GLOBS).map(lambda g: lambda: g),
        st.lists(st.sampled_from(GLOBS), min_size=1, max_size=3).map(lambda gs: lambda: list(gs)),
        st.sampled_from(modules).map(lambda m: lambda: m),
        st.sampled_from(params).map(lambda p: lambda: p),
        things.map(lambda xs: lambda: list(xs)),
        things.map(lambda xs: lambda: tuple(xs)),
        things.map(lambda xs: lambda: (x for x in xs)),
        st.sampled_from(CALLABLES).map(lambda f: lambda: f),
    )


def rule_recipes(model):
    rule = st.fixed_dictionaries({"params": selector_recipes(model), "lr_scale": st.sampled_from([0.5, 1, 10.0])},
                                 optional={"weight_decay": st.sampled_from([0.0, 0.1])})
    return st.lists(rule, max_size=5)


def options():
    return st.fixed_dictionaries({}, optional={"no_weight_decay": st.sampled_from([True, False, ["bn1.*", "mid.*"]]),
                                               "layer_decay": st.sampled_from([0.5, 0.9]),
                                               "default": st.sampled_from([{}, {"lr": 0.3, "lr_scale": 2.0}])})


def resolve(model, recipes, kwargs):
    rules = [{**recipe, "params": recipe["params"]()} for recipe in recipes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rules that select nothing are expected here
        return param_groups(model, rules, **kwargs)


def summary(groups):
    return [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]]) for g in groups]


def check_partition_and_determinism(model, recipes, kwargs):
    groups = resolve(model, recipes, kwargs)
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(trainable)  # every trainable parameter exactly once, no frozen one
    for group in groups:
        assert group["names"] == [trainable[id(p)] for p in group["params"]]
        assert group["lr_scale"] > 0 and "param_names" not in group
    tags = [g["rule"] for g in groups]
    assert sorted(set(t for t in tags if t != "default")) == list(range(len(recipes)))
    assert tags == sorted(tags, key=lambda t: len(recipes) if t == "default" else t)
    assert summary(resolve(model, recipes, kwargs)) == summary(groups)
    torch.optim.SGD(groups, lr=0.1)


@SETTINGS
@given(data=st.data())
def test_partition_and_determinism_on_the_seed_network(seed_net, data):
    seed_net.conv1.weight.requires_grad_(False)
    check_partition_and_determinism(seed_net, data.draw(rule_recipes(seed_net)), data.draw(options()))


@SETTINGS
@given(data=st.data())
def test_partition_and_determinism_with_a_tied_weight(tied_net, data):
    check_partition_and_determinism(tied_net, data.draw(rule_recipes(tied_net)), data.draw(options()))


@SETTINGS
@given(globs=st.lists(st.lists(st.sampled_from(GLOBS), min_size=1, max_size=2), max_size=4))
def test_first_matching_glob_rule_wins(tied_net, globs):
    groups = resolve(tied_net, [{"params": lambda g=g: g} for g in globs], {})
    got = {n: g["rule"] for g in groups for n in g["names"]}
    for name, p in tied_net.named_parameters():
        aliases = [a for a, q in tied_net.named_parameters(remove_duplicate=False) if q is p]
        first = next((i for i, patterns in enumerate(globs)
                      if any(fnmatch.fnmatchcase(a, pat) for a in aliases for pat in patterns)), "default")
        assert got[name] == first
