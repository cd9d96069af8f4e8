"""Eager vs graph: the same steps give the same parameters and optimizer state, with zero recompiles.

A table of optimizers and a table of schedulers; every case runs N steps in each mode from the same start.
Eager mode is torch.optim itself (with lr x lr_scale), so it is the reference for graph mode's update.
"""

import pytest
import torch
from torch.optim import lr_scheduler as sched

from tests.steps import Step, assert_same_state, batches, snapshot, tiny_groups, tiny_net

OPTIMIZERS = {
    "sgd": lambda g: torch.optim.SGD(g, lr=0.1),
    "sgd-momentum-nesterov-wd": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd-dampening-maximize": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.8, dampening=0.3, maximize=True),
    "adam": lambda g: torch.optim.Adam(g, lr=1e-2),
    "adam-amsgrad-wd": lambda g: torch.optim.Adam(g, lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "adamw": lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda g: torch.optim.RMSprop(g, lr=1e-2),
    "rmsprop-centered-momentum-wd": lambda g: torch.optim.RMSprop(g, lr=1e-2, momentum=0.5, centered=True,
                                                                  weight_decay=1e-2),
    "adagrad": lambda g: torch.optim.Adagrad(g, lr=0.1, lr_decay=0.01, weight_decay=1e-3,
                                             initial_accumulator_value=0.1),
}

class WarmupInverseSqrt(sched.LRScheduler):
    """A scheduler of the user's own: linear warm-up over 2 steps, then decay as 1/sqrt(step)."""

    def get_lr(self):
        s = max(self.last_epoch, 1)
        return [base * min(s / 2, (2 / s) ** 0.5) for base in self.base_lrs]


SCHEDULERS = {
    "none": lambda o: None,
    "step": lambda o: sched.StepLR(o, step_size=2, gamma=0.5),
    "multistep": lambda o: sched.MultiStepLR(o, milestones=[1, 3], gamma=0.3),
    "exponential": lambda o: sched.ExponentialLR(o, gamma=0.8),
    "cosine": lambda o: sched.CosineAnnealingLR(o, T_max=4),
    "lambda-per-group": lambda o: sched.LambdaLR(o, [lambda s: 1 / (1 + s), lambda s: 0.9**s, lambda s: 1.0]),
    "multiplicative": lambda o: sched.MultiplicativeLR(o, lambda s: 0.7),
    "linear": lambda o: sched.LinearLR(o, start_factor=0.2, total_iters=3),
    "onecycle": lambda o: sched.OneCycleLR(o, max_lr=0.2, total_steps=10),
    "sequential": lambda o: sched.SequentialLR(o, [sched.ConstantLR(o, factor=0.5, total_iters=2),
                                                   sched.ExponentialLR(o, gamma=0.9)], milestones=[2]),
    "chained": lambda o: sched.ChainedScheduler([sched.ConstantLR(o, factor=0.5, total_iters=2),
                                                 sched.ExponentialLR(o, gamma=0.9)]),
    "plateau": lambda o: sched.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=10.0),
    "custom": lambda o: WarmupInverseSqrt(o),
}

N_STEPS = 5


def run(mode, make_optimizer, make_scheduler, n=N_STEPS, on_step=None):
    model = tiny_net()
    optimizer = make_optimizer(tiny_groups(model))
    step = Step(model, optimizer, make_scheduler(optimizer), mode=mode)
    losses, lrs = [], []
    for i, (x, y) in enumerate(batches(n)):
        losses.append(step(x, y).item())
        lrs.append([g["lr"] for g in optimizer.param_groups])
        if on_step:
            on_step(i, step)
    return step, losses, lrs


def check_parity(make_optimizer, make_scheduler, on_step=None):
    eager, eager_losses, eager_lrs = run("eager", make_optimizer, make_scheduler, on_step=on_step)
    graph, graph_losses, graph_lrs = run("graph", make_optimizer, make_scheduler, on_step=on_step)
    assert_same_state(snapshot(eager), snapshot(graph))
    assert graph_lrs == eager_lrs  # the schedule itself ran the same
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    assert graph.compile_count == 1, graph.explain()
    assert eager.compile_count == 0
    return eager, graph


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_matches_torch_optim(name):
    check_parity(OPTIMIZERS[name], SCHEDULERS["step"])


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_runs_without_recompiling(name):
    check_parity(OPTIMIZERS["sgd-momentum-nesterov-wd"], SCHEDULERS[name])


def test_onecycle_cycles_adam_betas_without_recompiling():
    eager, graph = check_parity(OPTIMIZERS["adam"], SCHEDULERS["onecycle"])
    assert graph.optimizer.param_groups[0]["betas"][0] != 0.9  # the scheduler did move beta1


def test_direct_lr_writes_take_effect_at_the_next_step():
    def adjust_learning_rate(i, step):  # the tutorial's per-group decay, written into group["lr"]
        for group, factor in zip(step.optimizer.param_groups, (0.9, 0.8, 0.7)):
            group["lr"] *= factor

    check_parity(OPTIMIZERS["sgd"], SCHEDULERS["none"], on_step=adjust_learning_rate)


def test_unused_parameter_gets_no_state_in_either_mode():
    eager, graph = check_parity(OPTIMIZERS["adam"], SCHEDULERS["none"])
    for step in (eager, graph):
        assert step.model.unused.weight.grad is None
        assert step.optimizer.state.get(step.model.unused.weight, {}) == {}


def test_effective_lr_is_lr_times_lr_scale_after_one_sgd_step():
    """Hand computation: with plain SGD each parameter moves by exactly -lr x lr_scale x grad."""
    model = tiny_net(dtype=torch.float64)
    reference = tiny_net(dtype=torch.float64)
    (x, y), = batches(1, dtype=torch.float64)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    groups = tiny_groups(model)
    step = Step(model, torch.optim.SGD(groups, lr=1e-3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(x, y)
    for group in groups:
        for name in group["names"]:
            grad = reference.get_parameter(name).grad
            expected = before[name] if grad is None else before[name] - 1e-3 * group["lr_scale"] * grad
            torch.testing.assert_close(model.get_parameter(name).detach(), expected, rtol=1e-12, atol=1e-15)


def test_a_scheduler_of_the_users_own_follows_its_closed_form_in_graph_mode():
    step, _, lrs = run("graph", OPTIMIZERS["sgd"], SCHEDULERS["custom"])
    base = 0.1  # every group of tiny_groups takes the optimizer's lr
    expected = [base * min((i + 1) / 2, (2 / (i + 1)) ** 0.5) for i in range(N_STEPS)]
    assert lrs == [[pytest.approx(lr, rel=1e-12)] * 3 for lr in expected]
    assert step.compile_count == 1
