"""A TrainGraph's state: building it, checking it against a step before anything changes, and loading it.

The state holds what a step needs to continue: every module's state, the optimizer's and scheduler's, the step
count, and an accumulation window in progress (its micro-step count and the gradients summed so far, which live
in `p.grad` in both modes). A `layout` describes the param groups (qualified names, shapes, dtypes) and the
optimizer's and scheduler's classes, so a state can be checked against a step before any of it is loaded.
`check` raises `CheckpointError` naming what differs; `load` then changes the step and cannot fail half-way.
"""

from __future__ import annotations

import copy

import torch

from dualmode.groups.unwrap import bare_model

REQUIRED = ("modules", "layout", "optimizer", "lr_scheduler", "step_count", "micro_steps", "grads")


class CheckpointError(ValueError):
    """A checkpoint or state dict that does not fit the step (or is damaged); nothing of the step was changed.

    Raised by `dm.load_checkpoint` and `TrainGraph.load_state_dict` before anything is loaded, naming what
    differs (group, qualified parameter name, expected vs found shape or dtype, the damaged file).

    Example:
        >>> import torch, dualmode as dm
        >>> class Step(dm.TrainGraph):
        ...     def __init__(self, model):
        ...         super().__init__(mode="eager")
        ...         self.model = model
        ...         self.add_optimizer(torch.optim.SGD(dm.param_groups(model), lr=0.1))
        ...     def build(self, x):
        ...         loss = self.model(x).sum()
        ...         loss.backward()
        ...         return loss
        >>> saved = Step(torch.nn.Linear(3, 2)).state_dict()
        >>> try:
        ...     Step(torch.nn.Linear(3, 4)).load_state_dict(saved)
        ... except dm.CheckpointError as error:
        ...     print(type(error).__name__, isinstance(error, ValueError))
        CheckpointError True
    """


def _qualname(obj) -> str | None:
    return None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}"


def _shape(t) -> tuple:
    return tuple(t.shape)


def optimizer_params(step) -> list[tuple[str, torch.Tensor]]:
    """(qualified name, parameter) of every parameter of the optimizer, in group order, each once."""
    names = tensor_names(step)
    seen, out = set(), []
    for gi, group in enumerate(step.optimizer.param_groups if step.optimizer is not None else []):
        for pi, p in enumerate(group["params"]):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((names.get(id(p), f"<param group {gi}, parameter {pi}: outside the modules>"), p))
    return out


def tensor_names(step) -> dict[int, str]:
    """id(tensor) -> "attribute.qualified.name", the first name under which the step's modules reach it."""
    names: dict[int, str] = {}
    for attr, module in _bare_modules(step):
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            names.setdefault(id(t), f"{attr}.{name}")
    return names


def layout(step) -> dict:
    """What must match between a saved state and a step: each group's parameters, the optimizer and scheduler."""
    names = tensor_names(step)
    groups = []
    for group in step.optimizer.param_groups if step.optimizer is not None else []:
        groups.append([[names.get(id(p)), list(p.shape), str(p.dtype)] for p in group["params"]])
    return {"groups": groups, "optimizer": _qualname(step.optimizer), "lr_scheduler": _qualname(step.lr_scheduler)}


def build(step) -> dict:
    """The state of `step`, as live references (like torch's state_dict); gradients only inside a window."""
    grads = {}
    if step._micro_steps > 0:
        grads = {name: p.grad for name, p in optimizer_params(step) if p.grad is not None}
    return {
        "modules": {name: m.state_dict() for name, m in _bare_modules(step)},
        "layout": layout(step),
        "optimizer": None if step.optimizer is None else step.optimizer.state_dict(),
        "lr_scheduler": None if step.lr_scheduler is None else step.lr_scheduler.state_dict(),
        "step_count": step.step_count,
        "micro_steps": step._micro_steps,
        "grads": grads,
    }


# Checking ---------------------------------------------------------------------------------------------------------

def check(step, state) -> None:
    """Raise CheckpointError naming the first thing in `state` that does not fit `step`; change nothing."""
    if not isinstance(state, dict):
        raise CheckpointError(f"a step's state must be a dict, got {type(state).__name__}")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"the state lacks {missing} (it holds {sorted(state)})")
    _check_layout(step, state["layout"])
    _check_modules(step, state["modules"])
    _check_optimizer(step, state["optimizer"])
    _check_scheduler(step, state["lr_scheduler"])
    _check_counters(step, state)
    _check_grads(step, state["grads"], state["micro_steps"])


def _check_layout(step, saved) -> None:
    own = layout(step)
    if not isinstance(saved, dict) or set(saved) != set(own):
        raise CheckpointError(f"the state's layout must be a dict with keys {sorted(own)}, got {saved!r:.200}")
    for key in ("optimizer", "lr_scheduler"):
        if saved[key] != own[key]:
            raise CheckpointError(f"the state was saved with {key} {saved[key]}, this step has {own[key]}")
    if len(saved["groups"]) != len(own["groups"]):
        raise CheckpointError(f"the state has {len(saved['groups'])} param groups, this step's optimizer has "
                              f"{len(own['groups'])}")
    for gi, (theirs, mine) in enumerate(zip(saved["groups"], own["groups"])):
        if len(theirs) != len(mine):
            raise CheckpointError(f"param group {gi}: the state has {len(theirs)} parameters, this step has "
                                  f"{len(mine)} ({[m[0] for m in mine]})")
        for pi, ((name, shape, dtype), (own_name, own_shape, own_dtype)) in enumerate(zip(theirs, mine)):
            where = f"param group {gi}, parameter {pi} ({own_name!r})"
            if name != own_name:
                raise CheckpointError(f"param group {gi}, parameter {pi}: the state has {name!r}, this step "
                                      f"has {own_name!r}")
            if list(shape) != own_shape:
                raise CheckpointError(f"{where}: this step has shape {tuple(own_shape)}, the state "
                                      f"{tuple(shape)}")
            if dtype != own_dtype:
                raise CheckpointError(f"{where}: this step has dtype {own_dtype}, the state {dtype}")


def _check_modules(step, saved) -> None:
    modules = dict(_bare_modules(step))
    if not isinstance(saved, dict) or set(saved) != set(modules):
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"the state holds modules {found}, this step has {sorted(modules)}")
    for name, module in modules.items():
        own, theirs = module.state_dict(), saved[name]
        if set(own) != set(theirs):
            missing, extra = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
            raise CheckpointError(f"the state of module {name!r} does not match: missing {missing}, "
                                  f"unexpected {extra}")
        for key, value in own.items():
            _check_tensor(value, theirs[key], f"module {name!r}, {key!r}")


def _check_tensor(own, theirs, where: str) -> None:
    if not isinstance(own, torch.Tensor):
        if type(theirs) is not type(own):
            raise CheckpointError(f"{where}: this step has a {type(own).__name__}, the state a "
                                  f"{type(theirs).__name__}")
        return
    if not isinstance(theirs, torch.Tensor):
        raise CheckpointError(f"{where}: this step has a tensor, the state a {type(theirs).__name__}")
    if theirs.shape != own.shape:
        raise CheckpointError(f"{where}: this step has shape {_shape(own)}, the state {_shape(theirs)}")
    if theirs.dtype != own.dtype:
        raise CheckpointError(f"{where}: this step has dtype {own.dtype}, the state {theirs.dtype}")


def _both_or_neither(saved, live, key: str) -> bool:
    """True when both the state and the step have `key`, False when neither has; CheckpointError otherwise."""
    if (saved is None) != (live is None):
        raise CheckpointError(f"the state has {'no ' if saved is None else ''}{key} state, this step "
                              f"{'has' if saved is None else 'has no'} {key}")
    return live is not None


def _check_optimizer(step, saved) -> None:
    optimizer = step.optimizer
    if not _both_or_neither(saved, optimizer, "optimizer"):
        return
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"} or not isinstance(saved["state"], dict):
        raise CheckpointError("the optimizer state must be a dict with 'state' and 'param_groups', "
                              f"got {saved!r:.200}")
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"the optimizer state has {len(groups)} param groups, this step's optimizer has "
                              f"{len(optimizer.param_groups)}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = tensor_names(step)
    for gi, (theirs, mine) in enumerate(zip(groups, optimizer.param_groups)):
        if not isinstance(theirs, dict):
            raise CheckpointError(f"param group {gi}: the optimizer state has a {type(theirs).__name__}, not a dict")
        if len(theirs.get("params", ())) != len(mine["params"]):
            raise CheckpointError(f"param group {gi}: the optimizer state has {len(theirs.get('params', ()))} "
                                  f"parameters, this step has {len(mine['params'])}")
        lacking = sorted(set(mine) - set(theirs) - {"params"})
        if lacking:
            raise CheckpointError(f"param group {gi}: the optimizer state lacks {lacking}, which this step's "
                                  f"{type(optimizer).__name__} group has")
    for index, state in saved["state"].items():
        if not (isinstance(index, int) and 0 <= index < len(params)):
            raise CheckpointError(f"the optimizer state has an entry for parameter {index!r}; this step's "
                                  f"optimizer has {len(params)} parameters")
        if not isinstance(state, dict):
            raise CheckpointError(f"the optimizer state of parameter {index} is a {type(state).__name__}, not a dict")
        own = optimizer.state.get(params[index])
        if own:  # the live optimizer has stepped this parameter: the saved state must have the same entries
            where = f"optimizer state of {names.get(id(params[index]), f'parameter {index}')!r}"
            if set(own) != set(state):
                raise CheckpointError(f"{where}: this step's {type(optimizer).__name__} keeps {sorted(own)}, "
                                      f"the state {sorted(state)}")
            for key in own:
                if isinstance(own[key], torch.Tensor) and own[key].dim() > 0:
                    _check_tensor(own[key], state[key], f"{where}, {key!r}")


def _check_scheduler(step, saved) -> None:
    scheduler = step.lr_scheduler
    if not _both_or_neither(saved, scheduler, "lr_scheduler"):
        return
    if not isinstance(saved, dict):
        raise CheckpointError(f"the lr_scheduler state must be a dict, got {type(saved).__name__}")
    lacking = sorted(set(scheduler.state_dict()) - set(saved))
    if lacking:
        raise CheckpointError(f"the lr_scheduler state lacks {lacking}, which this step's "
                              f"{type(scheduler).__name__} has")
    base_lrs = saved.get("base_lrs")
    if base_lrs is not None and len(base_lrs) != len(step.optimizer.param_groups):
        raise CheckpointError(f"the lr_scheduler state has {len(base_lrs)} base lrs, this step's optimizer has "
                              f"{len(step.optimizer.param_groups)} param groups")


def _check_counters(step, state) -> None:
    for key in ("step_count", "micro_steps"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"the state's {key} must be an int >= 0, got {value!r}")
    k = step.config.grad_accumulation_steps
    if state["micro_steps"] >= k:
        raise CheckpointError(f"the state is {state['micro_steps']} micro-batches into an accumulation window, "
                              f"but this step's config.grad_accumulation_steps is {k}")


def _check_grads(step, grads, micro_steps: int) -> None:
    if not isinstance(grads, dict):
        raise CheckpointError(f"the state's grads must be a dict, got {type(grads).__name__}")
    if grads and micro_steps == 0:
        raise CheckpointError(f"the state has gradients of {sorted(grads)[:3]}... but no accumulation window "
                              "in progress (micro_steps is 0)")
    params = dict(optimizer_params(step))
    for name, grad in grads.items():
        if name not in params:
            raise CheckpointError(f"the state has a gradient for {name!r}, which is not a parameter of this "
                                  "step's optimizer")
        _check_tensor(params[name], grad, f"gradient of {name!r}")


# Loading ----------------------------------------------------------------------------------------------------------

def load(step, state) -> None:
    """Load a state that `check` accepted; copies, so the step shares no tensor with `state`."""
    for name, module in _bare_modules(step):
        module.load_state_dict(state["modules"][name])
    if step.optimizer is not None:
        step.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
    if step.lr_scheduler is not None:
        step.lr_scheduler.load_state_dict(copy.deepcopy(state["lr_scheduler"]))
    step.step_count = state["step_count"]
    step._micro_steps = state["micro_steps"]
    grads = state["grads"]
    for name, p in optimizer_params(step):
        p.grad = grads[name].detach().to(p.device, copy=True) if name in grads else None


def _bare_modules(step) -> list:
    """The step's modules as (attribute, module), DDP and torch.compile wrappers seen through (any world size)."""
    return [(name, bare_model(m)) for name, m in step._modules_of_step()]
