"""Graph mode runs the optimizer's own `step()`: traced inside the step's make_fx trace, so the math is torch's.

For the trace, the optimizer is given stand-in param groups and state for the length of one `step()` call:
each parameter is a stand-in carrying the traced gradient, each state tensor a graph input, and each group's
lr (times its lr_scale) and other float hyperparameters 0-d tensor inputs, so schedulers never recompile.
torch.optim's step turns its step count into a Python number (`_get_value`, `.item()`) unless it runs under
torch.compile or with `capturable=True`: the trace runs with both (capturable set on the stand-in groups only).
A float hyperparameter that the step branches on in Python (`if weight_decay != 0`) cannot be a tensor: it is
found by tracing a two-element copy of the step (`runtime_names`) and baked into the graph like a switch.

The state is created before compiling, as torch.optim creates it (`initial_state`): the optimizer's own step
runs once eagerly on copies of the parameters, and what it stores in the state first is kept. Running that
step also makes graph mode refuse what eager mode refuses (capturable=True on CPU, state missing after a
mid-run switch such as amsgrad False -> True), with torch's own error. State created from the first gradient
(SGD's momentum buffer) is "lazy": the graph computes both the first step and a later one and picks per
parameter, as torch's `if buf is None` does.
"""

from __future__ import annotations

import collections
import contextlib
from collections import defaultdict
from typing import NamedTuple
from unittest import mock

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from dualmode.step import policy

# Group entries that are dualmode's, not the optimizer's; every other entry of `optimizer.defaults` is the step's.
NOT_THE_OPTIMIZERS = ("params", "lr_scale", "names", "param_names", "clip_grad_max_norm", "clip_grad_norm_type")
# Entries set on the stand-in groups only: the trace needs capturable arithmetic, one code path, no autograd.
TRACE_SETTINGS = {"capturable": True, "foreach": False, "fused": False, "differentiable": False}


def own_step(optimizer: torch.optim.Optimizer):
    """The optimizer class's step function without torch's profiling and hook wrapper (hooks are refused)."""
    fn = type(optimizer).step
    return fn.__wrapped__ if getattr(fn, "hooked", False) else fn


def hyper_candidates(optimizer: torch.optim.Optimizer, group: dict) -> list[str]:
    """The group's float hyperparameters (lr first), by name; a tuple's items as 'betas.0', 'betas.1'."""
    names = []
    for key in ["lr"] + [k for k in optimizer.defaults if k != "lr" and k not in NOT_THE_OPTIMIZERS]:
        value = group.get(key)
        if _is_float(value):
            names.append(key)
        elif isinstance(value, tuple):
            names += [f"{key}.{i}" for i, v in enumerate(value) if _is_float(v)]
    return names


def _is_float(value) -> bool:
    return (isinstance(value, float) or (isinstance(value, torch.Tensor) and value.numel() == 1
                                         and value.is_floating_point()))


def hyper_value(group: dict, name: str):
    key, _, index = name.partition(".")
    return group[key][int(index)] if index else group[key]


def switches(optimizer: torch.optim.Optimizer, group: dict, runtime: tuple[str, ...]) -> NamedTuple:
    """The group's values baked into the graph (every optimizer setting that is not a runtime input), by name."""
    values = {}
    for key in optimizer.defaults:
        if key in NOT_THE_OPTIMIZERS:
            continue
        value = group.get(key)
        if isinstance(value, tuple):
            value = tuple("runtime" if f"{key}.{i}" in runtime else v for i, v in enumerate(value))
        elif key in runtime:
            value = "runtime"
        values[key] = value if _hashable(value) else repr(value)
    return _switch_type(type(optimizer).__name__, tuple(values))(**values)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return not isinstance(value, torch.Tensor)


_SWITCH_TYPES: dict[tuple, type] = {}


def _switch_type(name: str, fields: tuple) -> type:
    key = (name, fields)
    if key not in _SWITCH_TYPES:
        _SWITCH_TYPES[key] = collections.namedtuple(f"{name}Switches", fields, rename=True)
    return _SWITCH_TYPES[key]


@contextlib.contextmanager
def lent(optimizer: torch.optim.Optimizer, groups: list[dict], state):
    """The optimizer steps `groups` and `state` instead of its own for the length of the block."""
    saved = optimizer.param_groups, optimizer.state
    optimizer.param_groups, optimizer.state = groups, state
    try:
        yield
    finally:
        optimizer.param_groups, optimizer.state = saved


@contextlib.contextmanager
def as_compiled():
    """torch.optim takes its torch.compile code path (no `.item()` on tensors, no capturable device check)."""
    with mock.patch.object(torch.compiler, "is_compiling", lambda: True):
        yield


def stand_in_group(group: dict, index: int, params: list, hypers: dict) -> dict:
    """A copy of `group` for one traced step: the stand-in params, runtime hyperparameters, trace settings."""
    copy = dict(group)
    copy["params"] = params
    copy["lr"] = policy.scaled_lr(group["lr"], group, index)  # a baked lr; replaced below when it is an input
    for name, value in hypers.items():
        key, _, i = name.partition(".")
        if i:
            items = list(copy[key])
            items[int(i)] = value
            copy[key] = tuple(items)
        else:
            copy[key] = policy.scaled_lr(value, group, index) if name == "lr" else value
    copy.update({k: v for k, v in TRACE_SETTINGS.items() if k in copy})
    return copy


def run_step(optimizer, groups: list[dict], members: dict, hypers: dict, state: dict, traced: bool,
             in_place: bool = False) -> dict:
    """One `step()` of the optimizer over copies (or, `in_place`, over the given tensors themselves); return
    {member: (new param, new state dict)}.

    members: {member: (group index, param, grad)}; hypers: {group index: {name: value}};
    state: {member: state dict to start from}. With `traced`, the stand-in settings and compiled code path.
    In place is what inductor compiles best (input mutations, as for torch.compile(optimizer.step)).
    """
    # Copies that require grad as parameters do: under differentiable=True torch refuses to update such a leaf in
    # place, in eager mode as here.
    params = {m: p if in_place else p.detach().clone().requires_grad_(True) for m, (_, p, _) in members.items()}
    per_group = defaultdict(list)
    for m, (gi, _, grad) in members.items():
        params[m].grad = grad
        per_group[gi].append(params[m])
    new_state = defaultdict(Recording)
    for m, start in state.items():
        new_state[params[m]] = Recording({k: v.clone() if isinstance(v, torch.Tensor) and not in_place else v
                                          for k, v in start.items()})
    if traced:
        lent_groups = [stand_in_group(g, gi, per_group[gi], hypers.get(gi, {})) for gi, g in enumerate(groups)]
    else:
        lent_groups = [dict(g, params=per_group[gi], lr=policy.scaled_lr(g["lr"], g, gi))
                       for gi, g in enumerate(groups)]
    with lent(optimizer, lent_groups, new_state), (as_compiled() if traced else contextlib.nullcontext()):
        own_step(optimizer)(optimizer)
    return {m: (params[m], new_state[params[m]]) for m in members}


class Recording(dict):
    """A state dict that remembers the first value stored under each new key (the state as it was created)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.created: dict = {}

    def __setitem__(self, key, value):
        if key not in self and key not in self.created:
            self.created[key] = value.clone() if isinstance(value, torch.Tensor) else value
        super().__setitem__(key, value)


def initial_state(optimizer, groups: list[dict], params: list[tuple[int, torch.Tensor]]):
    """Run the optimizer's own step eagerly on copies of `params` (group index, param) from their current state.

    Returns ({param id: {key: initial value}} for state the step created, the lazy keys). Raises what torch.optim
    raises for this configuration, so graph mode refuses what eager mode refuses.
    """
    name = type(optimizer).__name__
    created = []
    for fill in (0.0, 1.0):  # two gradients: state whose first value differs between them is made from the gradient
        members = {id(p): (gi, p, torch.full_like(p, fill)) for gi, p in params}
        start = {id(p): optimizer.state[p] for _, p in params if p in optimizer.state}
        with _named(name):
            out = run_step(optimizer, groups, members, {}, start, traced=False)
        created.append({m: dict(state.created) for m, (_, state) in out.items()})
    lazy = set()
    for m, first in created[0].items():
        for key, value in first.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"graph mode needs {name}'s state to hold tensors only, but its step() stores "
                                f"state[{key!r}] = {value!r}; keep it as a 0-d tensor, or run with mode='eager'")
            if not torch.equal(value, created[1][m][key]):
                lazy.add(key)
    initial = {m: {k: torch.zeros_like(v) if k in lazy else v for k, v in first.items()}
               for m, first in created[0].items()}
    return initial, tuple(sorted(lazy))


@contextlib.contextmanager
def _named(name: str):
    """Re-raise what the optimizer's own step raised, said to come from it (same type, same message after)."""
    try:
        yield
    except (KeyError, RuntimeError, ValueError, TypeError, AssertionError) as error:
        message = (f"graph mode ran {name}'s own step() on copies of the parameters before compiling, and it "
                   f"refused, as eager mode does: {error.args[0] if error.args else error!r}")
        try:
            refusal = type(error)(message)
        except TypeError:
            refusal = RuntimeError(message)
        raise refusal from error


def runtime_names(optimizer, group: dict, index: int) -> tuple[str, ...]:
    """Which of the group's float hyperparameters the traced step can take as 0-d tensors.

    They are traced all as tensors on a copy of the step over two-element parameters (one per distinct number
    of dimensions of the group's parameters); if that fails, each is tried alone: one the step branches on, or
    turns into a Python number, fails its trace and is baked instead. TypeError naming the optimizer if its
    step cannot be traced even with every hyperparameter baked.
    """
    shapes = {p.dim(): (p.dtype, (2,) * p.dim()) for p in group["params"] if p.requires_grad}
    if not shapes:
        return ()
    tiny = [torch.zeros(shape, dtype=dtype) for dtype, shape in shapes.values()]
    solo = dict(group, params=tiny)
    initial, _ = initial_state(optimizer, [solo], [(0, p) for p in tiny])
    candidates = hyper_candidates(optimizer, group)

    def traces(names):
        return _traces(optimizer, solo, tiny, initial, {n: _as_tensor(hyper_value(group, n)) for n in names})

    if traces(candidates):
        return tuple(candidates)
    error = _trace_error(optimizer, solo, tiny, initial)
    if error is not None:
        name = type(optimizer).__name__
        raise TypeError(f"graph mode cannot trace {name}.step() (param group {index}): it needs Python values of "
                        f"tensors ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]}). Run this "
                        "step with mode='eager'.") from error
    keep = [n for n in candidates if traces([n])]
    if len(keep) > 1 and not traces(keep):
        keep = keep[:1] if keep[0] == "lr" else []
    return tuple(keep)


def _traces(optimizer, group: dict, tiny: list, initial: dict, hypers: dict) -> bool:
    return _trace_error(optimizer, group, tiny, initial, hypers) is None


def _trace_error(optimizer, group: dict, tiny: list, initial: dict, hypers: dict | None = None):
    """The error of tracing one step of the optimizer over `tiny` with `hypers` as tensors, or None."""
    hypers = hypers or {}

    def step(*flat):
        members = {id(p): (0, f, torch.ones_like(f)) for p, f in zip(tiny, flat[:len(tiny)])}
        state = {id(p): initial.get(id(p), {}) for p in tiny}
        run_step(optimizer, [group], members, {0: dict(zip(hypers, flat[len(tiny):]))}, state, traced=True)
        return ()

    try:
        make_fx(step, tracing_mode="fake", _allow_non_fake_inputs=True)(*tiny, *hypers.values())
    except Exception as error:  # noqa: BLE001 - any failure means: not traceable this way
        return error
    return None


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(())
    return torch.tensor(value, dtype=torch.float64)
