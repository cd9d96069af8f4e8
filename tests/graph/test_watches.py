"""Graph mode honours or names every Python value its trace depends on (issue 10, CONTRACT.md section 4).

The table of changes is tests/graph/watch_cases.py; each case runs eager and graph mode in lockstep (aot_eager),
applies the change to both, and runs two more steps: graph mode recompiles once with a warning naming the
change and then equals eager mode, or refuses the call with an error naming it and changes nothing.
"""

import pytest
import torch
from torch import nn

import dualmode as dm
from tests.graph.watch_cases import CHANGES, WatchStep, make_watch_step, watch_batches
from tests.steps import assert_same_state, snapshot


def _call(step, x, y, seed):
    torch.manual_seed(seed)  # the same dropout masks in both modes (aot_eager draws them as eager does)
    return step(x, y)


@pytest.mark.parametrize("case", CHANGES, ids=[c.name for c in CHANGES])
def test_a_change_between_calls_recompiles_with_its_name_or_is_refused(case):
    eager, graph = make_watch_step("eager"), make_watch_step("graph")
    (x0, y0), (x1, y1), (x2, y2) = watch_batches(3)
    handles = []
    try:
        for step in (eager, graph):
            _call(step, x0, y0, 10)
        for step in (eager, graph):
            handles.append(case.change(step))
        _call(eager, x1, y1, 11)
        if case.expect == "refused":
            before = snapshot(graph)
            with pytest.raises(TypeError, match=case.pattern):
                _call(graph, x1, y1, 11)
            assert_same_state(before, snapshot(graph), rtol=0, atol=0)
            assert graph.step_count == 1
            return
        with pytest.warns(dm.RecompileWarning, match=case.pattern):
            _call(graph, x1, y1, 11)
        for step in (eager, graph):
            _call(step, x2, y2, 12)
        assert graph.compile_count == 2
        assert_same_state(snapshot(eager), snapshot(graph))
    finally:
        if case.undo is not None:
            for handle in handles:
                case.undo(handle)


def test_going_back_to_a_value_seen_before_reuses_its_compiled_variant():
    step = make_watch_step("graph")
    (x, y), = watch_batches(1)
    step(x, y)
    step.alpha = 0.5
    with pytest.warns(dm.RecompileWarning, match="WatchStep.alpha changed: 1.0 -> 0.5"):
        step(x, y)
    step.alpha = 1.0
    step(x, y)  # no warning (filterwarnings=error): the first variant's guard holds again
    assert step.compile_count == 2 and step.explain().graphs == 2


def test_an_attribute_build_does_not_read_never_recompiles():
    step = make_watch_step("graph")
    (x, y), = watch_batches(1)
    step(x, y)
    step.epoch = 3  # set by a training loop, not read by build()
    step.model.note = "anything"
    step(x, y)
    assert step.compile_count == 1


def _hooked_before_first_call(kind):
    def make(mode):
        step = make_watch_step(mode)
        if kind == "forward":
            step.model.act.register_forward_hook(lambda m, a, out: out * 2)
        elif kind == "full backward":
            step.model.fc2.register_full_backward_hook(lambda m, gi, go: tuple(g * 3 for g in gi))
        return step
    return make


@pytest.mark.parametrize("kind", ["forward", "full backward"])
def test_module_hooks_registered_before_the_first_call_run_as_in_eager(kind):
    make = _hooked_before_first_call(kind)
    eager, graph = make("eager"), make("graph")
    for i, (x, y) in enumerate(watch_batches(3)):
        _call(eager, x, y, i)
        _call(graph, x, y, i)
    assert graph.compile_count == 1
    assert_same_state(snapshot(eager), snapshot(graph))


@pytest.mark.parametrize("register, pattern", [
    (lambda p: p.register_hook(lambda g: g.clamp(-0.01, 0.01)), "tensor hook"),
    (lambda p: p.register_post_accumulate_grad_hook(lambda p: None), "post-accumulate-grad hook"),
])
def test_a_tensor_hook_on_a_parameter_is_refused_at_the_first_call_naming_it(register, pattern):
    step = make_watch_step("graph")
    register(step.model.fc1.bias)
    (x, y), = watch_batches(1)
    before = snapshot(step)
    with pytest.raises(TypeError, match=f"parameter model.fc1.bias has a {pattern}"):
        step(x, y)
    assert_same_state(before, snapshot(step), rtol=0, atol=0)
    assert step.compile_count == 0
    step.mode = "eager"  # eager mode runs the hook
    step(x, y)


class ReadsStepCount(WatchStep):
    def build(self, x, y):
        loss = self.loss_fn(self.model(x), y) / (1 + self.step_count)
        loss.backward()
        return loss


def test_build_reading_step_count_is_refused_with_a_way_out():
    step = make_watch_step("graph", ReadsStepCount)
    (x, y), = watch_batches(1)
    with pytest.raises(dm.TraceError, match=r"ReadsStepCount.build\(\) reads self.step_count, which changes at "
                                            r"every call.*torch.tensor\(step.step_count\)"):
        step(x, y)
    assert step.compile_count == 0


class KeepsLogits(WatchStep):
    def build(self, x, y):
        self.logits = self.model(x)
        loss = self.loss_fn(self.logits, y)
        loss.backward()
        return loss


class CountingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def test_an_attribute_assigned_while_tracing_is_named():
    step = make_watch_step("graph", KeepsLogits)
    (x, y), = watch_batches(1)
    with pytest.raises(dm.TraceError, match=r"KeepsLogits.build\(\) assigned KeepsLogits.logits while graph mode "
                                            r"traced it \(\(not set\) -> a tensor of shape \((16|s\d+), 3\)\)"):
        step(x, y)
    assert "logits" not in vars(step)  # put back as it was: no stand-in tensor left on the step
    counting = CountingNet()
    step = make_watch_step("graph", model=counting)
    with pytest.raises(dm.TraceError, match=r"assigned model.calls while graph mode traced it \(0 -> 1\)"):
        step(x, y)
    assert counting.calls == 0 and step.compile_count == 0
