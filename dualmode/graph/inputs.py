"""The inputs of a traced step: which tensors go in, in which order, and what the cache key of a call is.

Every tensor the step reads or writes is an input of the graph: parameters, buffers, the call's tensor
arguments, each group's lr and numeric hyperparameters (0-d tensors, so their values never recompile), the
optimizer's state and, with gradient accumulation, the gradients summed so far. A slot names where an input
comes from; at call time `StepCall.fetch` gets the real tensor, creating optimizer state as torch.optim would.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

from dualmode.graph import updates
from dualmode.graph.slots import (ApplySlot, ArgSlot, GradSlot, GroupSignature, HasBufferSlot, HyperSlot, Slot,
                                   StateSlot, TensorSignature, TensorSlot, input_signature)
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
        self.rule = None
        self._hyper_cache: dict[int, dict[str, float]] = {}
        if self.optimizer is not None:
            self.rule = updates.rule_for(self.optimizer)
            self._check_optimizer()

    def _check_optimizer(self) -> None:
        optimizer = self.optimizer
        name = type(optimizer).__name__
        if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
            raise TypeError(f"graph mode does not call {name}'s step hooks, and this optimizer has some: "
                            "run the step with mode='eager' or remove the hooks")
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) not in self.tensors.index:
                    raise ValueError(
                        f"param group {gi}, parameter {pi} (shape {tuple(p.shape)}) is not a parameter of any "
                        f"module of {self.step.name}; graph mode updates only parameters of the "
                        "nn.Module attributes of the step")

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
            "config": (config.autocast_dtype, config.clip_grad_max_norm, config.clip_grad_norm_type,
                       config.check_finite, config.recompute_activations, config.dynamic_batch,
                       repr(sorted(config.compile_options.items()))),
        }
        if self.optimizer is not None:
            index = self.tensors.index
            parts["groups"] = tuple(
                GroupSignature(tuple(index[id(p)] for p in g["params"]), self.rule.flags(g),
                               (g.get("clip_grad_max_norm"), g.get("clip_grad_norm_type", 2.0)))
                for g in self.groups)
            parts["lr_scale"] = tuple(float(g.get("lr_scale", 1.0)) for g in self.groups)
        return parts

    def slots(self) -> list[Slot]:
        """The inputs of the traced step, in order; each slot says where its tensor comes from."""
        slots: list[Slot] = [TensorSlot(i) for i in range(len(self.tensors.tensors))]
        slots += [ArgSlot(k) for k, v in enumerate(self.leaves) if isinstance(v, torch.Tensor)]
        if self.optimizer is None:
            return slots
        if self.phase in ("accumulate", "apply"):
            slots.append(ApplySlot())
        for gi, group in enumerate(self.groups):
            slots += [HyperSlot(gi, name) for name in ("lr",) + self.rule.hyper]
            flags = self.rule.flags(group)
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                ti = self.tensors.index[id(p)]
                if self.rule.lazy:
                    slots.append(HasBufferSlot(gi, ti))
                slots += [StateSlot(gi, ti, k) for k in self.rule.state(flags, p, group)]
                if self.phase in ("accumulate", "apply"):
                    slots.append(GradSlot(gi, ti))
        return slots

    def example(self, slot: Slot, scalars: dict) -> torch.Tensor:
        """A tensor to trace the slot with; unlike `fetch`, it creates no optimizer state and no gradient."""
        if isinstance(slot, StateSlot):
            p, group = self.tensors.tensors[slot.tensor], self.groups[slot.group]
            existing = self.optimizer.state.get(p, {}).get(slot.key)
            return existing if existing is not None else self.rule.state(self.rule.flags(group), p, group)[slot.key]
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
            return _scalar(scalars, slot, torch.float64).fill_(self._hyper(slot.group)[slot.name])
        if isinstance(slot, HasBufferSlot):
            p = self.tensors.tensors[slot.tensor]
            has = self.optimizer.state.get(p, {}).get(self.rule.lazy) is not None
            return _scalar(scalars, slot, torch.bool).fill_(has)
        if isinstance(slot, ApplySlot):
            return _scalar(scalars, slot, torch.bool).fill_(self.phase == "apply")
        if isinstance(slot, StateSlot):
            p, group = self.tensors.tensors[slot.tensor], self.groups[slot.group]
            state = self.optimizer.state.get(p, {})
            if state.get(slot.key) is None:
                new = self.rule.state(self.rule.flags(group), p, group)[slot.key]
                if self.phase == "accumulate":  # not updated on this micro-step: created at the first update
                    return new
                state = self.optimizer.state[p]
                state[slot.key] = new
            return state[slot.key]
        if isinstance(slot, GradSlot):
            p = self.tensors.tensors[slot.tensor]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            return p.grad
        raise ValueError(f"unknown input slot {slot!r}")

    def _hyper(self, gi: int) -> dict[str, float]:
        if gi not in self._hyper_cache:
            group = self.groups[gi]
            self._hyper_cache[gi] = {"lr": float(group["lr"]), **updates.hyper_values(self.rule, group)}
        return self._hyper_cache[gi]


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
    if t is None:
        t = scalars[key] = torch.zeros((), dtype=dtype)
    return t
