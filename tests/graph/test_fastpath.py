"""The steady-state call (graph/fastpath.py) reuses the last call's walk: every change it could miss is seen.

Each case trains a few calls, makes one change a user might make between calls, and checks that graph mode
either recompiles (with a RecompileWarning) or refuses, and that the parameters stay equal to eager mode's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dualmode as dm
from tests.steps import Step, batches, tiny_groups, tiny_net


def pair(momentum: float = 0.9):
    model = tiny_net()
    ref = copy.deepcopy(model)
    graph = Step(model, torch.optim.SGD(tiny_groups(model), lr=0.1, momentum=momentum))
    eager = Step(ref, torch.optim.SGD(tiny_groups(ref), lr=0.1, momentum=momentum), mode="eager")
    return graph, eager


def train(graph, eager, data) -> None:
    for x, y in data:
        torch.testing.assert_close(graph(x, y), eager(x, y), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(graph.model.named_parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def freeze_fc1(step):
    step.model.fc1.weight.requires_grad_(False)


def replace_fc2_weight(step):
    with torch.no_grad():
        new = nn.Parameter(step.model.fc2.weight.detach().clone() * 0.5)
    for group in step.optimizer.param_groups:
        group["params"] = [new if p is step.model.fc2.weight else p for p in group["params"]]
    step.model.fc2.weight = new


def swap_head(step):
    torch.manual_seed(3)
    old, step.model.head = step.model.head, nn.Linear(8, 3)
    new_of = dict(zip(map(id, old.parameters()), step.model.head.parameters()))
    for group in step.optimizer.param_groups:
        group["params"] = [new_of.get(id(p), p) for p in group["params"]]


def eval_mode(step):
    step.model.eval()


def change_lr_scale(step):
    step.optimizer.param_groups[1]["lr_scale"] = 3.0


def switch_nesterov(step):
    for group in step.optimizer.param_groups:
        group["nesterov"] = True


def new_clip(step):
    step.config.clip_grad_max_norm = 0.05


def transpose_fc1_weight(step):
    # Same shape and values, another memory layout: the compiled kernels index by strides.
    p = step.model.fc1.weight
    p.data = torch.empty_strided(p.shape, (1, p.shape[0])).copy_(p.data)


def hook_on_head(step):
    # The head's hook dicts were empty: their sizes change (the guard compares the items of non-empty ones only).
    step.model.head.register_forward_hook(lambda module, args, out: out * 0.5)


CHANGES = [freeze_fc1, swap_head, eval_mode, change_lr_scale, switch_nesterov, new_clip,
           transpose_fc1_weight, hook_on_head]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
def test_a_change_after_steady_calls_recompiles_and_matches_eager(change):
    graph, eager = pair()
    data = batches(6)
    train(graph, eager, data[:3])
    assert graph.compile_count == 1
    change(graph)
    change(eager)
    with pytest.warns(dm.RecompileWarning):
        train(graph, eager, data[3:4])
    train(graph, eager, data[4:])
    assert graph.compile_count == 2


def test_a_new_parameter_of_the_same_layout_runs_the_compiled_variant_on_it():
    # Parameters are inputs of the graph, not constants: a replaced one is fed in its place (fresh momentum, as
    # torch.optim starts it), without a recompile.
    graph, eager = pair()
    data = batches(6)
    train(graph, eager, data[:3])
    replace_fc2_weight(graph)
    replace_fc2_weight(eager)
    train(graph, eager, data[3:])
    assert graph.compile_count == 1


def test_steady_calls_compile_once_and_new_values_of_runtime_inputs_apply():
    graph, eager = pair()
    data = batches(6)
    train(graph, eager, data[:2])
    for step in (graph, eager):
        step.optimizer.param_groups[0]["lr"] = 0.02  # a runtime input: no recompile
        step.optimizer.param_groups[2]["momentum"] = 0.5
    train(graph, eager, data[2:])
    assert graph.compile_count == 1


def test_a_new_optimizer_hook_after_steady_calls_is_refused():
    graph, eager = pair()
    train(graph, eager, batches(2))
    graph.optimizer.register_step_post_hook(lambda *a: None)
    x, y = batches(1, seed=9)[0]
    before = [p.detach().clone() for p in graph.model.parameters()]
    with pytest.raises(TypeError, match="step hooks"):
        graph(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, graph.model.parameters()))


def test_a_tensor_hook_added_after_steady_calls_is_refused_naming_the_parameter():
    graph, eager = pair()
    train(graph, eager, batches(2))
    graph.model.fc2.bias.register_hook(lambda g: g * 2)
    x, y = batches(1, seed=9)[0]
    with pytest.raises(TypeError, match="model.fc2.bias has a tensor hook"):
        graph(x, y)


def test_arguments_that_change_structure_take_the_full_path():
    graph, eager = pair()
    data = batches(5)
    train(graph, eager, data[:2])
    x, y = data[2]
    with pytest.warns(dm.RecompileWarning, match="structure of the inputs changed"):
        torch.testing.assert_close(graph(x, y=y), eager(x, y=y), rtol=1e-5, atol=1e-6)
    train(graph, eager, data[3:])  # positional again: the first variant, not a third compile
    assert graph.compile_count == 2


def test_optimizer_state_replaced_in_another_layout_is_refused_naming_it_and_nothing_changes():
    # The compiled code assumes the traced layout (inductor's own asserts fire only after earlier kernels ran).
    model = tiny_net()
    step = Step(model, torch.optim.SGD(tiny_groups(model), lr=0.1, momentum=0.9))
    for x, y in batches(2):
        step(x, y)
    state = step.optimizer.state[model.fc1.weight]
    buf = state["momentum_buffer"]
    state["momentum_buffer"] = torch.empty_strided(buf.shape, (1, buf.shape[0])).copy_(buf)  # transposed layout
    before = [p.detach().clone() for p in model.parameters()] + [state["momentum_buffer"].clone()]
    x, y = batches(1, seed=7)[0]
    with pytest.raises(RuntimeError, match="optimizer state 'momentum_buffer' of model.fc1.weight has shape"):
        step(x, y)
    after = [p.detach() for p in model.parameters()] + [state["momentum_buffer"]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    state["momentum_buffer"] = state["momentum_buffer"].contiguous()  # as the message says: then it runs again
    step(x, y)
    assert step.compile_count == 1


def test_a_hook_replaced_by_another_keeping_their_number_recompiles_and_matches_eager():
    graph, eager = pair()
    handles = [step.model.head.register_forward_hook(lambda module, args, out: out * 0.5) for step in (graph, eager)]
    data = batches(5)
    train(graph, eager, data[:3])
    for step, handle in zip((graph, eager), handles):
        handle.remove()
        step.model.head.register_forward_hook(lambda module, args, out: out * 2.0)
    with pytest.warns(dm.RecompileWarning, match="forward hooks"):
        train(graph, eager, data[3:4])
    train(graph, eager, data[4:])
    assert graph.compile_count == 2



def test_a_list_in_a_param_group_changed_in_place_after_steady_calls_applies():
    # The resolver's `names` and a betas list are lists: the steady-state check compares them by value, since
    # identity does not tell an in-place change.
    results = []
    for mode in ("graph", "eager"):
        model = tiny_net()
        step = Step(model, torch.optim.Adam(tiny_groups(model), lr=0.01), mode=mode)
        betas = [0.9, 0.999]
        for group in step.optimizer.param_groups:
            group["betas"] = betas
        for i, (x, y) in enumerate(batches(6)):
            if i == 3:
                betas[0] = 0.5  # the list all groups share, changed in place
                step.optimizer.param_groups[1]["names"].append("renamed")
            step(x, y)
        results.append([p.detach().clone() for p in model.parameters()])
        if mode == "graph":
            assert step.compile_count == 1  # betas are runtime inputs
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_schedulers_new_lr_is_compared_by_identity_from_the_next_call_on(monkeypatch):
    from dualmode.graph import fastpath

    graph, eager = pair()
    schedulers = [torch.optim.lr_scheduler.StepLR(s.optimizer, step_size=3, gamma=0.5) for s in (graph, eager)]
    recomputed = []
    real = fastpath.group_settings
    monkeypatch.setattr(fastpath, "group_settings", lambda plan, group: recomputed.append(1) or real(plan, group))
    for i, (x, y) in enumerate(batches(7)):
        recomputed.clear()
        torch.testing.assert_close(graph(x, y), eager(x, y), rtol=1e-5, atol=1e-6)
        # The first call notes the three groups' settings; call 4 follows the scheduler's step: they are
        # recomputed once, then reused (and again at call 7).
        assert len(recomputed) == (3 if i in (0, 3, 6) else 0), i
        for scheduler in schedulers:
            scheduler.step()
    assert graph.compile_count == 1
    train(graph, eager, [])


def halve_a_momentum_buffer(step):
    state = step.optimizer.state[step.model.fc1.weight]
    state["momentum_buffer"] = state["momentum_buffer"] * 0.5  # a new tensor in the same dict


def new_state_dict_of_a_parameter(step):
    p = step.model.fc2.weight
    step.optimizer.state[p] = {"momentum_buffer": step.optimizer.state[p]["momentum_buffer"] * -1.0}


def forget_a_parameters_state(step):
    del step.optimizer.state[step.model.head.bias]  # torch.optim starts its momentum afresh


def write_a_buffer_in_place(step):
    step.optimizer.state[step.model.fc1.bias]["momentum_buffer"].zero_()


def reload_the_optimizer(step):
    step.optimizer.load_state_dict(step.saved)


STATE_CHANGES = [halve_a_momentum_buffer, new_state_dict_of_a_parameter, forget_a_parameters_state,
                 write_a_buffer_in_place, reload_the_optimizer]


@pytest.mark.parametrize("change", STATE_CHANGES, ids=lambda f: f.__name__)
def test_optimizer_state_changed_after_steady_calls_is_fed_anew(change, monkeypatch):
    # The steady fetch (graph/fetch.py) hands on the last call's state tensors while their dicts hold them: each
    # change here must reach the compiled step as it reaches torch.optim, without a recompile.
    from dualmode.graph import fetch

    held = []
    real = fetch._Steady.holds
    monkeypatch.setattr(fetch._Steady, "holds", lambda self, *a: held.append(real(self, *a)) or held[-1])
    graph, eager = pair()
    data = batches(7)
    train(graph, eager, data[:1])
    for step in (graph, eager):
        step.saved = copy.deepcopy(step.optimizer.state_dict())
    train(graph, eager, data[1:4])
    assert held[-2:] == [True, True]  # the steady path was taken before the change
    before = len(held)
    change(graph)
    change(eager)
    train(graph, eager, data[4:])
    assert graph.compile_count == 1
    # The first call after the change fetched anew (but after an in-place write: the same tensor is fed), and
    # the steady path resumed.
    assert held[before] is (change is write_a_buffer_in_place) and held[-1] is True
