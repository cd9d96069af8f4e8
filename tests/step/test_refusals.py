"""What a step refuses, alike in both modes, and what a refused call leaves behind: nothing (issue 10).

optimizer.step()/zero_grad() inside build(), errors that name the real mistake, config.check_finite over the
loss and every gradient, bad group lrs, and input gradients in graph mode.
"""

from contextlib import nullcontext

import pytest
import torch

import dualmode as dm
from tests.steps import FAST, Step, assert_same_state, batches, snapshot, tiny_net

MODES = ["eager", "graph"]


def make(mode, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5), build=None,
         **config):
    cls = Step if build is None else type("Custom", (Step,), {"build": build})
    model = tiny_net()
    return cls(model, optimizer(model.parameters()), mode=mode,
               config=dm.StepConfig(compile_options=dict(FAST), **config))


def _loss(step, x, y):
    return step.loss_fn(step.model(x), y)


def _full_state(step):
    grads = [None if p.grad is None else p.grad.clone() for p in step.model.parameters()]
    return snapshot(step), grads, step.step_count, step.optimizer.param_groups[0]["lr"]


def _assert_unchanged(before, step):
    (state, grads, count, lr), now = before, _full_state(step)
    assert_same_state(state, now[0], rtol=0, atol=0)
    for a, b in zip(grads, now[1]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert (count, lr) == now[2:]


# optimizer.step() / zero_grad() inside build() ------------------------------------------------------------

def _calls_step(self, x, y):
    loss = _loss(self, x, y)
    loss.backward()
    self.optimizer.step()
    return loss


def _calls_zero_grad(self, x, y):
    self.optimizer.zero_grad()
    loss = _loss(self, x, y)
    loss.backward()
    return loss


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("build, name", [(_calls_step, "step"), (_calls_zero_grad, "zero_grad")])
def test_build_calling_the_optimizer_is_an_error_and_updates_nothing(mode, build, name):
    step = make(mode, build=build)
    scheduler = torch.optim.lr_scheduler.StepLR(step.optimizer, 1, gamma=0.5)
    step.lr_scheduler = scheduler
    wrapped = step.optimizer.step  # the scheduler's wrapper of optimizer.step, which must survive
    (x, y), = batches(1)
    before = snapshot(step)
    with pytest.raises(RuntimeError, match=rf"^Custom.build\(\) called optimizer.{name}\(\): the step calls it"):
        step(x, y)
    assert_same_state(before, snapshot(step), rtol=0, atol=0)
    assert step.step_count == 0 and step.compile_count == 0 and step.optimizer.step is wrapped


# Errors that name the real mistake, and cache nothing ------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_missing_backward_is_named_first(mode):
    step = make(mode, build=lambda self, x, y: _loss(self, x, y))
    (x, y), = batches(1)
    with pytest.raises(RuntimeError, match=r"^Custom.build\(\) left no gradient on any parameter.*loss.backward"):
        step(x, y)
    assert step.compile_count == 0


def test_a_float64_input_to_a_float32_model_is_named_and_nothing_is_cached():
    step = make("graph")
    (x, y), = batches(1)
    before = snapshot(step)
    with pytest.raises(dm.TraceError, match=r"mat1 and mat2 must have the same dtype.*\(input 0 is float64, the "
                                            r"parameters are float32\)"):
        step(x.double(), y)
    assert step.compile_count == 0 and step.explain().graphs == 0
    assert_same_state(before, snapshot(step), rtol=0, atol=0)
    assert not step.optimizer.state  # the momentum buffers that call created are gone
    step(x, y)  # compiles as a first call: no RecompileWarning (filterwarnings = error)
    assert step.compile_count == 1 and step.explain().recompiles == []


# check_finite: the loss, every gradient, and nothing left behind -------------------------------------------

def _nan_gradient(self, x, y):
    loss = _loss(self, x, y)
    (loss + self.model.fc2.bias.sum() * float("nan")).backward()
    return loss


def _loss_and_backward(value):
    def build(self, x, y):
        loss = _loss(self, x, y)
        loss.backward()
        return value(loss)
    return build


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("build, error, pattern", [
    (_nan_gradient, FloatingPointError, r"not finite at step 1: the gradient of model.fc2.bias; "),
    (_loss_and_backward(lambda loss: loss * float("inf")), FloatingPointError, "the loss is inf"),
    (_loss_and_backward(lambda loss: None), ValueError, r"needs the loss, but Step.build\(\) returned None"),
    (_loss_and_backward(lambda loss: loss.expand(3)), ValueError, r"returned a tensor of shape \(3,\)"),
    (_loss_and_backward(lambda loss: {"total": loss}), ValueError, r"a dict without a 'loss' entry \(keys \['total'\]"),
])
def test_check_finite_refuses_and_leaves_everything_as_before(mode, build, error, pattern):
    step = make(mode, check_finite=True)
    step.lr_scheduler = torch.optim.lr_scheduler.StepLR(step.optimizer, 1, gamma=0.5)
    data = batches(2)
    step(*data[0])
    before = _full_state(step)
    step.build = build.__get__(step)  # graph mode sees the new build() and recompiles, saying so
    warned = pytest.warns(dm.RecompileWarning, match="Step.build changed") if mode == "graph" else nullcontext()
    with warned, pytest.raises(error, match=pattern):
        step(*data[1])
    _assert_unchanged(before, step)


@pytest.mark.parametrize("optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
], ids=["SGD-dampening", "Adam"])
def test_a_refused_first_call_creates_no_optimizer_state(optimizer):
    results = {}
    nan_x = torch.full((16, 6), float("nan"))
    for mode in MODES:
        step = make(mode, optimizer=optimizer, check_finite=True)
        data = batches(2)
        with pytest.raises(FloatingPointError, match="the loss is nan"):
            step(nan_x, data[0][1])
        assert not step.optimizer.state
        for x, y in data:
            step(x, y)
        results[mode] = snapshot(step)
    assert_same_state(results["eager"], results["graph"])


@pytest.mark.parametrize("mode", MODES)
def test_a_refused_micro_batch_keeps_the_gradients_accumulated_so_far(mode):
    step = make(mode, check_finite=True, grad_accumulation_steps=3)
    reference = make("eager", grad_accumulation_steps=3)
    data = batches(3)
    for s in (step, reference):
        s(*data[0])
    before = _full_state(step)
    with pytest.raises(FloatingPointError, match="the loss is nan"):
        step(data[1][0] * float("nan"), data[1][1])
    _assert_unchanged(before, step)
    for s in (step, reference):
        s(*data[1])
        s(*data[2])
    assert step.step_count == reference.step_count == 1
    assert_same_state(snapshot(reference), snapshot(step))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lr", [float("nan"), -0.1, float("inf"), torch.tensor(float("nan")), "0.1"])
def test_a_group_lr_that_is_not_a_finite_number_at_least_zero_is_named(mode, lr):
    step = make(mode)
    step.optimizer.param_groups[0]["lr"] = lr
    (x, y), = batches(1)
    before = snapshot(step)
    with pytest.raises(ValueError, match=r"param group 0: lr must be a finite number >= 0, got "):
        step(x, y)
    assert_same_state(before, snapshot(step), rtol=0, atol=0)


# Input gradients ----------------------------------------------------------------------------------------

def test_an_input_that_requires_grad_gets_its_grad_as_in_eager():
    grads = {}
    for mode in MODES:
        step = make(mode)
        (x, y), (_, y2) = batches(2)
        x = x.clone().requires_grad_(True)
        step(x, y)
        first = x.grad.clone()
        step(x, y2)  # accumulates into x.grad, as autograd does
        grads[mode] = (first, x.grad)
    torch.testing.assert_close(grads["graph"][0], grads["eager"][0])
    torch.testing.assert_close(grads["graph"][1], grads["eager"][1])


def test_requires_grad_of_an_input_is_part_of_the_cache_key():
    step = make("graph")
    (x, y), = batches(1)
    step(x, y)
    x = x.clone().requires_grad_(True)
    with pytest.warns(dm.RecompileWarning, match="input 0 changed: requires_grad: False -> True"):
        step(x, y)
    assert x.grad is not None


def test_an_input_computed_by_autograd_outside_the_step_is_refused_in_graph_mode():
    step = make("graph")
    (x, y), = batches(1)
    scale = torch.ones(6, requires_grad=True)
    with pytest.raises(ValueError, match=r"argument 0 of Step \(shape \(16, 6\)\) was computed by autograd outside"):
        step(x * scale, y)
