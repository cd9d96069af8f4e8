"""Graph mode's SGD and Adam rules update each param group with torch._foreach_* ops; eager torch.optim is the
reference.

Every switch a rule bakes in (SGD: momentum, dampening, nesterov, weight decay, maximize; Adam: weight decay,
coupled or decoupled (AdamW), amsgrad, maximize) on TinyNet's three groups with distinct lr_scale, under a
scheduler that changes lr at every call, with one compile; SGD's momentum buffer made from the first gradient,
per parameter; check_finite skipping a non-finite step.
"""

import pytest
import torch
from torch.optim import lr_scheduler as sched

import dualmode as dm
from tests.steps import FAST, Step, assert_same_state, batches, snapshot, tiny_groups, tiny_net

# (momentum, dampening, nesterov): torch allows nesterov only with momentum and no dampening
MOMENTUM = [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False), (0.9, 0.0, True)]


def sgd(momentum, dampening, nesterov, weight_decay, maximize):
    return lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=momentum, dampening=dampening,
                                          nesterov=nesterov, weight_decay=weight_decay, maximize=maximize)


def run(mode, make_optimizer, n=4, config=None, on_step=None):
    model = tiny_net()
    optimizer = make_optimizer(tiny_groups(model))
    step = Step(model, optimizer, sched.LambdaLR(optimizer, lambda s: 1 / (1 + s)), mode=mode, config=config)
    losses = []
    for i, (x, y) in enumerate(batches(n)):
        losses.append(step(x, y).item())
        if on_step:
            on_step(i, step)
    return step, losses


def foreach_ops(step) -> set:
    return {str(n.target) for n in step.graph_module.graph.nodes if "_foreach_" in str(n.target)}


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "maximize"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2], ids=["no-wd", "wd"])
@pytest.mark.parametrize("momentum,dampening,nesterov", MOMENTUM,
                         ids=["no-momentum", "momentum", "dampening", "nesterov"])
def test_every_sgd_switch_matches_torch_optim_with_lr_scale_and_a_scheduler(momentum, dampening, nesterov,
                                                                           weight_decay, maximize):
    make = sgd(momentum, dampening, nesterov, weight_decay, maximize)
    eager, eager_losses = run("eager", make)
    graph, graph_losses = run("graph", make)
    assert_same_state(snapshot(eager), snapshot(graph))
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    assert graph.compile_count == 1, graph.explain()
    assert graph.optimizer.param_groups[0]["lr"] == eager.optimizer.param_groups[0]["lr"] < 0.1 * 0.5
    ops = foreach_ops(graph)
    assert {"aten._foreach_sub.List", "aten._foreach_copy_.default"} <= ops, ops
    assert ("aten._foreach_neg.default" in ops) == maximize


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "maximize"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2], ids=["no-wd", "wd"])
def test_every_adam_switch_matches_torch_optim_with_lr_scale_and_a_scheduler(cls, maximize, amsgrad, weight_decay):
    def make(groups):
        return cls(groups, lr=1e-2, betas=(0.8, 0.95), weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)

    eager, eager_losses = run("eager", make)
    graph, graph_losses = run("graph", make)
    assert_same_state(snapshot(eager), snapshot(graph))
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    assert graph.compile_count == 1, graph.explain()
    ops = foreach_ops(graph)
    assert {"aten._foreach_sqrt.default", "aten._foreach_copy_.default"} <= ops, ops
    assert ("aten._foreach_maximum.List" in ops) == amsgrad


@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_a_momentum_buffer_dropped_for_one_parameter_is_made_again_from_its_gradient_as_torch_does(dampening):
    def drop_one(i, step):  # that parameter's next step is a first step again (`buf is None` in torch)
        if i == 1:
            del step.optimizer.state[step.model.fc2.weight]["momentum_buffer"]

    make = sgd(0.9, dampening, False, 1e-2, False)
    eager, _ = run("eager", make, on_step=drop_one)
    graph, _ = run("graph", make, on_step=drop_one)
    assert_same_state(snapshot(eager), snapshot(graph))
    assert graph.compile_count == 1, graph.explain()


@pytest.mark.parametrize("make", [sgd(0.0, 0.0, False, 1e-2, False), sgd(0.9, 0.0, False, 1e-2, False),
                                  lambda g: torch.optim.AdamW(g, lr=1e-2)], ids=["sgd", "sgd-momentum", "adamw"])
def test_check_finite_skips_a_non_finite_step_of_a_foreach_rule_and_trains_on_like_eager(make):
    config = dm.StepConfig(check_finite=True, compile_options=dict(FAST))
    (x, y), (x2, y2) = batches(2)
    states = []
    for mode in ("eager", "graph"):
        model = tiny_net()
        step = Step(model, make(tiny_groups(model)), mode=mode, config=config)
        step(x, y)
        before = snapshot(step)
        with pytest.raises(FloatingPointError, match="the loss is nan"):
            step(x2 * float("nan"), y2)
        assert_same_state(before, snapshot(step), rtol=0, atol=0)
        step(x2, y2)
        assert step.step_count == 2
        states.append(snapshot(step))
    assert_same_state(*states)
