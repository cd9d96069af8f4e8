"""Changes a user can make between two calls of a step, each with what graph mode must do about it.

Shared by tests/graph/test_watches.py (which holds graph mode to eager mode on each case) and
benchmarks/watch_table.py (which prints the outcome of each case as a table).
Each case: a step is built twice (eager, graph), both run one step in lockstep, `change` is applied to both,
then both run two more steps. `expect` is "recompile" (graph recompiles once, with a RecompileWarning matching
`pattern`, and then equals eager) or "refused" (the graph call after the change raises, matching `pattern`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import dualmode as dm
from tests.steps import FAST


class WatchNet(nn.Module):
    """Linear, BatchNorm, LeakyReLU, Dropout, a Sequential, Linear: every kind of Python attribute a forward reads."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.act = nn.LeakyReLU(0.1)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.head(self.drop(self.act(self.bn(self.fc1(x))))))


class WatchStep(dm.TrainGraph):
    """A step whose build() reads a Python loss weight of its own."""

    def __init__(self, model, optimizer, mode):
        super().__init__(mode=mode, config=dm.StepConfig(compile_options=dict(FAST)))
        self.model = model
        self.loss_fn = nn.CrossEntropyLoss()
        self.alpha = 1.0
        self.add_optimizer(optimizer)

    def build(self, x, y):
        loss = self.alpha * self.loss_fn(self.model(x), y)
        loss.backward()
        return loss


def make_watch_step(mode: str, cls: type = WatchStep, model: nn.Module | None = None) -> WatchStep:
    """A `cls` step (WatchStep or a subclass) on a WatchNet (or `model`), SGD with momentum."""
    torch.manual_seed(0)
    model = WatchNet() if model is None else model
    return cls(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), mode)


def watch_batches(n: int):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _double(module, args, output):
    return output * 2


def _halve_input(module, args):
    return (args[0] * 0.5,)


def _scale_grad_input(module, grad_input, grad_output):
    return tuple(None if g is None else g * 3 for g in grad_input)


@dataclass(frozen=True)
class Change:
    name: str
    change: Callable[[WatchStep], object]
    expect: str  # "recompile" or "refused"
    pattern: str
    undo: Callable[[object], None] | None = None  # for global state: called with what `change` returned


def _set(obj_path: str, value_fn):
    def change(step):
        *owner, attr = obj_path.split(".")
        obj = step
        for part in owner:
            obj = getattr(obj, part)
        setattr(obj, attr, value_fn())
    return change


def _set_child(sequential: str, index: int, make):
    def change(step):
        getattr(step.model, sequential)[index] = make()
    return change


CHANGES = [
    Change("step's loss weight self.alpha", _set("alpha", lambda: 0.25), "recompile",
           r"WatchStep\.alpha changed: 1\.0 -> 0\.25"),
    Change("self.loss_fn replaced", _set("loss_fn", lambda: nn.CrossEntropyLoss(label_smoothing=0.2)),
           "recompile", r"WatchStep\.loss_fn changed: .*CrossEntropyLoss"),
    Change("loss_fn.label_smoothing changed", _set("loss_fn.label_smoothing", lambda: 0.3), "recompile",
           r"loss_fn\.label_smoothing changed: 0\.0 -> 0\.3"),
    Change("parameter-free submodule replaced (model.act = nn.Tanh())", _set("model.act", nn.Tanh),
           "recompile", r"model\.act changed: LeakyReLU.* -> Tanh"),
    Change("a Sequential's child replaced (model.head[1] = nn.Sigmoid())", _set_child("head", 1, nn.Sigmoid),
           "recompile", r"model\.head\.1 changed: ReLU\(\) -> Sigmoid\(\)"),
    Change("dropout.p changed", _set("model.drop.p", lambda: 0.5), "recompile",
           r"model\.drop\.p changed: 0\.25 -> 0\.5"),
    Change("LeakyReLU.negative_slope changed", _set("model.act.negative_slope", lambda: 0.3), "recompile",
           r"model\.act\.negative_slope changed: 0\.1 -> 0\.3"),
    Change("BatchNorm.momentum changed", _set("model.bn.momentum", lambda: 0.5), "recompile",
           r"model\.bn\.momentum changed: 0\.1 -> 0\.5"),
    Change("forward of a module patched (model.act.forward = torch.sigmoid)",
           _set("model.act.forward", lambda: torch.sigmoid), "recompile",
           r"model\.act\.forward changed: \(not set\) -> <built-in method sigmoid"),
    Change("forward hook registered after compiling",
           lambda s: s.model.act.register_forward_hook(_double), "recompile", r"model\.act: forward hooks changed"),
    Change("forward pre-hook registered after compiling",
           lambda s: s.model.fc2.register_forward_pre_hook(_halve_input), "recompile",
           r"model\.fc2: forward pre-hooks changed"),
    Change("full backward hook registered after compiling",
           lambda s: s.model.fc2.register_full_backward_hook(_scale_grad_input), "recompile",
           r"model\.fc2: backward hooks changed"),
    Change("global module forward hook registered after compiling",
           lambda s: nn.modules.module.register_module_forward_hook(_double), "refused",
           r"a global module forward hook is registered", undo=lambda handle: handle.remove()),
    Change("tensor hook on a parameter (p.register_hook)",
           lambda s: s.model.fc1.weight.register_hook(lambda g: g * 2), "refused",
           r"model\.fc1\.weight has a tensor hook"),
    Change("post-accumulate-grad hook on a parameter",
           lambda s: s.model.fc2.bias.register_post_accumulate_grad_hook(lambda p: None), "refused",
           r"model\.fc2\.bias has a post-accumulate-grad hook"),
]
