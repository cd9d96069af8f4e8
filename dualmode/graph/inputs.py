"""The inputs of a traced step: which tensors go in, in which order, and what the cache key of a call is.

Every tensor the step reads or writes is an input of the graph: parameters, buffers, the call's tensor
arguments, each group's lr and numeric hyperparameters (0-d tensors, so their values never recompile), the
optimizer's state and, with gradient accumulation, the gradients summed so far. A slot names where an input
comes from; at call time `StepCall.fetch` gets the real tensor, creating optimizer state as torch.optim would.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

from dualmode.graph import plans
from dualmode.graph.slots import (
    ArgSlot,
    GradSlot,
    GroupSignature,
    HasBufferSlot,
    HyperSlot,
    Slot,
    StateSlot,
    TensorSignature,
    TensorSlot,
    input_signature,
)
from dualmode.step.view import StepView


class StepTensors:
    """The parameters and buffers of the step's modules, each tensor once, under its first qualified name."""

    def __init__(self, modules: list[tuple[str, torch.nn.Module]]):
        self.modules = [module for _, module in modules]
        self.tensors: list[torch.Tensor] = []
        self.names: list[str] = []
        self.is_param: list[bool] = []
        self.index: dict[int, int] = {}
        for attr, module in modules:
            named = [(n, t, True) for n, t in module.named_parameters()]
            named += [(n, t, False) for n, t in module.named_buffers()]
            for name, t, is_param in named:
                if id(t) not in self.index:
                    self.index[id(t)] = len(self.tensors)
                    self.tensors.append(t)
                    self.names.append(f"{attr}.{name}")
                    self.is_param.append(is_param)

    def signature(self) -> tuple[TensorSignature, ...]:
        # Strides too: the compiled kernels are specialised to each tensor's memory layout (channels_last, ...).
        return tuple(TensorSignature(n, tuple(t.shape), t.dtype, t.device, t.requires_grad, tuple(t.stride()))
                     for n, t in zip(self.names, self.tensors))


class StepCall:
    """One call of a step in graph mode: what it is given, its cache key, and its input slots."""

    def __init__(self, step: StepView, phase: str, args: tuple, kwargs: dict):
        self.step, self.phase = step, phase
        self.modules = step.modules
        self.tensors = StepTensors(self.modules)
        self.leaves, self.in_spec, self._spec_text = _flatten(args, kwargs)
        self.optimizer = step.optimizer
        self.plan = None
        self._hyper_cache: dict[int, dict] = {}
        self.created: list[tuple[torch.Tensor, str | None]] = []  # state (p, key) and gradients (p, None) made here
        if self.optimizer is not None:
            self.plan = plans.plan_for(self.optimizer)
            self._check_optimizer()
            self._check_inputs()

    def again(self, step: StepView, phase: str, leaves: list, hyper: dict) -> StepCall:
        """A call like this one, with new arguments (same structure): the walk and the checks are reused."""
        call = object.__new__(StepCall)
        call.__dict__.update(self.__dict__)
        call.step, call.phase, call.leaves = step, phase, leaves
        call._hyper_cache, call.created = hyper, []
        if call.optimizer is not None:
            call.check_settings()
        return call

    def _check_inputs(self) -> None:
        for k, v in enumerate(self.leaves):
            if isinstance(v, torch.Tensor) and v.requires_grad and v.grad_fn is not None:
                raise ValueError(
                    f"graph mode: argument {k} of {self.step.name} (shape {tuple(v.shape)}) was computed by autograd "
                    f"outside the step ({type(v.grad_fn).__name__}); the traced step cannot backpropagate beyond its "
                    "inputs as eager mode would: detach it, move its computation into build(), or run the step "
                    "with mode='eager'")

    def _check_optimizer(self) -> None:
        self.check_settings()
        for gi, group in enumerate(self.optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) not in self.tensors.index:
                    raise ValueError(
                        f"param group {gi}, parameter {pi} (shape {tuple(p.shape)}) is not a parameter of any "
                        f"module of {self.step.name}; graph mode updates only parameters of the "
                        "nn.Module attributes of the step")

    def check_settings(self) -> None:
        """Refuse optimizer settings graph mode cannot honour (checked at every call: they may change)."""
        optimizer = self.optimizer
        name = type(optimizer).__name__
        if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
            raise TypeError(f"graph mode does not call {name}'s step hooks, and this optimizer has some: "
                            "run the step with mode='eager' or remove the hooks")
        if type(optimizer) is not torch.optim.NAdam or self.step.config.compile_options.get("backend",
                                                                                           "inductor") != "inductor":
            return
        for gi, group in enumerate(optimizer.param_groups):
            if group.get("weight_decay") and not group.get("decoupled_weight_decay"):
                # Measured: inductor's code for it differs from eager by 2e-2 (aot_eager and eager match); a
                # wrong update must not run silently, so it is refused until the cause is found.
                raise TypeError(
                    f"graph mode with inductor cannot run NAdam with coupled weight decay (param group {gi}, "
                    f"weight_decay={group['weight_decay']}): its compiled update differs from eager mode's. Use "
                    "decoupled_weight_decay=True, the 'aot_eager' backend, or mode='eager'")

    @property
    def groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def key_parts(self) -> dict:
        """What the compiled step depends on, by name; a change in any part compiles a new variant."""
        config = self.step.config
        parts = {
            "phase": self.phase,
            "inputs": (self._spec_text, tuple(input_signature(v) for v in self.leaves)),
            "tensors": self.tensors.signature(),
            "training": tuple(m.training for module in self.tensors.modules for m in module.modules()),
            "config": config_values(config)[:-1] + (repr(sorted(config.compile_options.items())),),
        }
        if self.optimizer is not None:
            index = self.tensors.index
            settings = [group_settings(self.plan, g)[0] for g in self.groups]
            parts["groups"] = tuple(GroupSignature(tuple(index[id(p)] for p in g["params"]), flags, clip)
                                    for g, (flags, _, clip, _) in zip(self.groups, settings))
            parts["lr_scale"] = tuple(scale for _, scale, _, _ in settings)
            parts["hyper_dtypes"] = tuple(dtypes for _, _, _, dtypes in settings)
        return parts

    def slots(self) -> list[Slot]:
        """The inputs of the traced step, in order; each slot says where its tensor comes from."""
        slots: list[Slot] = [TensorSlot(i) for i in range(len(self.tensors.tensors))]
        slots += [ArgSlot(k) for k, v in enumerate(self.leaves) if isinstance(v, torch.Tensor)]
        if self.optimizer is None:
            return slots
        self.plan.prepare(self.groups)
        for gi, group in enumerate(self.groups):
            slots += [HyperSlot(gi, name) for name in self.plan.hyper_names(group)]
            flags = self.plan.flags(group)
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                ti = self.tensors.index[id(p)]
                if self.plan.lazy:
                    slots.append(HasBufferSlot(gi, ti))
                slots += [StateSlot(gi, ti, k) for k in self.plan.state(flags, p, group)]
                if self.phase in ("accumulate", "apply"):
                    slots.append(GradSlot(gi, ti))
        return slots

    def example(self, slot: Slot, scalars: dict) -> torch.Tensor:
        """A tensor to trace the slot with; unlike `fetch`, it creates no optimizer state and no gradient."""
        if isinstance(slot, StateSlot):
            p, group = self.tensors.tensors[slot.tensor], self.groups[slot.group]
            existing = self.optimizer.state.get(p, {}).get(slot.key)
            return existing if existing is not None else self.plan.state(self.plan.flags(group), p, group)[slot.key]
        if isinstance(slot, GradSlot):
            p = self.tensors.tensors[slot.tensor]
            return p.grad if p.grad is not None else torch.zeros_like(p)
        return self.fetch(slot, scalars)

    def fetch(self, slot: Slot, scalars: dict) -> torch.Tensor:
        """The real tensor of one slot at call time; creates optimizer state the way torch.optim would."""
        if isinstance(slot, TensorSlot):
            t = self.tensors.tensors[slot.index]
            return t.detach() if self.tensors.is_param[slot.index] else t
        if isinstance(slot, ArgSlot):
            return self.leaves[slot.index]
        if isinstance(slot, HyperSlot):
            value = self._hyper(slot.group)[slot.name]
            value = value.detach().reshape(()) if isinstance(value, torch.Tensor) else value
            return _scalar(scalars, slot, _dtype_of(value)).fill_(value)
        if isinstance(slot, HasBufferSlot):
            p = self.tensors.tensors[slot.tensor]
            has = self.optimizer.state.get(p, {}).get(self.plan.lazy) is not None
            return _scalar(scalars, slot, torch.bool).fill_(has)
        if isinstance(slot, StateSlot):
            p, group = self.tensors.tensors[slot.tensor], self.groups[slot.group]
            state = self.optimizer.state[p]
            if state.get(slot.key) is None:
                state[slot.key] = self.plan.state(self.plan.flags(group), p, group)[slot.key]
                self.created.append((p, slot.key))
            return state[slot.key]
        if isinstance(slot, GradSlot):
            p = self.tensors.tensors[slot.tensor]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
                self.created.append((p, None))
            return p.grad
        raise ValueError(f"unknown input slot {slot!r}")

    def undo_created(self) -> None:
        """Remove the optimizer state and gradients `fetch` created, for a call that did not update."""
        for p, key in reversed(self.created):
            if key is None:
                p.grad = None
                continue
            state = self.optimizer.state.get(p, {})
            state.pop(key, None)
            if not state:
                self.optimizer.state.pop(p, None)
        self.created.clear()

    def _hyper(self, gi: int) -> dict:
        if gi not in self._hyper_cache:
            self._hyper_cache[gi] = self.plan.hyper_values(self.groups[gi])
        return self._hyper_cache[gi]


def config_values(config) -> tuple:
    """The config fields a compiled step depends on; the last one, compile_options, is the dict itself."""
    return (config.autocast_dtype, config.clip_grad_max_norm, config.clip_grad_norm_type, config.check_finite,
            config.recompute_activations, config.dynamic_batch, config.compile_options)


def group_settings(plan, group: dict) -> tuple[tuple, dict]:
    """What a compiled step bakes in of one param group (switches, lr_scale, clip setting, hyperparameter
    dtypes), and the group's current hyperparameter values."""
    hyper = plan.hyper_values(group)
    baked = (plan.flags(group), float(group.get("lr_scale", 1.0)),
             (group.get("clip_grad_max_norm"), group.get("clip_grad_norm_type", 2.0)),
             tuple(_dtype_of(v) for v in hyper.values()))
    return baked, hyper


def _dtype_of(value) -> torch.dtype:
    # A tensor hyperparameter keeps its dtype, since torch.optim computes with it in that dtype; floats are float64.
    return value.dtype if isinstance(value, torch.Tensor) else torch.float64


_PLAIN_SPECS: dict[int, tuple] = {}  # number of tensor arguments -> (spec, its text)


def _flatten(args: tuple, kwargs: dict) -> tuple[list, object, str]:
    """tree_flatten((args, kwargs)) and the spec's text; the usual call (tensors only) reuses a cached spec."""
    if not kwargs and all(type(a) is torch.Tensor for a in args):
        cached = _PLAIN_SPECS.get(len(args))
        if cached is None:
            spec = tree_flatten((args, kwargs))[1]
            cached = _PLAIN_SPECS[len(args)] = (spec, str(spec))
        return list(args), *cached
    leaves, spec = tree_flatten((args, kwargs))
    return leaves, spec, str(spec)


def _scalar(scalars: dict, key: Slot, dtype: torch.dtype) -> torch.Tensor:
    # One persistent 0-d tensor per runtime scalar, refilled at each call.
    t = scalars.get(key)
    if t is None or t.dtype != dtype:
        t = scalars[key] = torch.zeros((), dtype=dtype)
    return t
