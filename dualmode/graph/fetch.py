"""Fetching the inputs of a compiled variant at each call, with as little Python as possible.

The slots of a variant are fixed when it is compiled, so the way to get each one is chosen once (`FetchPlan`:
one small tuple per slot, read by position) rather than by an `isinstance` chain and dict lookups keyed by
slot objects (a dataclass's hash is a Python call) per slot and call. The bulk of the slots of a small model
are its parameters (a detached alias each), their optimizer state (as torch.optim holds it) and the groups'
runtime scalars: those persistent 0-d tensors are refilled only when the group's value changed since this plan
last filled them and nothing else wrote them since (their version counter says so), which is exact: the
compiled step only reads them. Missing optimizer state, gradients and tensor hyperparameters go through
`StepCall.fetch`, which creates state the way torch.optim would.
"""

from __future__ import annotations

import torch

from dualmode.graph.inputs import StepCall, _scalar
from dualmode.graph.layouts import LayoutCheck
from dualmode.graph.slots import ArgSlot, GradSlot, HasBufferSlot, HyperSlot, StateSlot, TensorSlot

TENSOR, ARG, HYPER, STATE, HAS_BUFFER, OTHER = range(6)
_UNSEEN = object()


class FetchPlan:
    """How to get each input of one compiled variant, in order."""

    def __init__(self, slots: list):
        self.slots = slots
        self._steps: list[tuple] = []
        for slot in slots:
            kind = type(slot)
            if kind is TensorSlot:  # a parameter as it is: the compiled step runs under no_grad
                self._steps.append((TENSOR, slot.index))
            elif kind is ArgSlot:
                self._steps.append((ARG, slot.index))
            elif kind is HyperSlot:
                self._steps.append((HYPER, slot.group, slot.name, slot))
            elif kind is StateSlot:
                self._steps.append((STATE, slot.tensor, slot.key, slot))
            elif kind is HasBufferSlot:
                self._steps.append((HAS_BUFFER, slot.tensor, None, slot))
            else:
                self._steps.append((OTHER, slot))
        # The slots start with the parameters and buffers, then the arguments: those two runs in one C-level map each.
        kinds = [step[0] for step in self._steps]
        tensors_end = _run_end(kinds, 0, TENSOR)
        args_end = _run_end(kinds, tensors_end, ARG)
        self._tensor_run = [step[1] for step in self._steps[:tensors_end]]
        self._arg_run = [step[1] for step in self._steps[tensors_end:args_end]]
        self._rest = range(args_end, len(slots))
        self._filled: list = [None] * len(slots)  # per scalar slot: (tensor, value, version) as last filled here
        # Optimizer state and gradients: the cache key does not cover their layout (a user may replace them),
        # and the compiled code assumes the traced one, so it is compared at every call (a few hundred ns each).
        self.checked = [i for i, slot in enumerate(slots) if type(slot) in (StateSlot, GradSlot)]
        self._layouts = None
        self._check: LayoutCheck | None = None

    def traced_layouts(self, examples: list) -> None:
        """Note the (shape, strides, dtype) the trace saw for the checked slots."""
        self._layouts = [(tuple(examples[i].shape), tuple(examples[i].stride()), examples[i].dtype)
                         for i in self.checked]

    def traced(self, position: int) -> tuple:
        return self._layouts[self.checked.index(position)]

    def misfit(self, inputs: list) -> int | None:
        """The position of the first checked input laid out otherwise than traced, or None."""
        checked = list(map(inputs.__getitem__, self.checked))
        if self._check is not None and self._check.same(checked):
            return None
        now = [(tuple(t.shape), t.stride(), t.dtype) for t in checked]
        if now != self._layouts:
            return next(i for i, a, b in zip(self.checked, now, self._layouts) if a != b)
        self._check = LayoutCheck(checked)  # as traced: from now on compared with these in one check
        return None

    def inputs(self, call: StepCall, scalars: dict) -> list[torch.Tensor]:
        tensors, leaves = call.tensors.tensors, call.leaves
        state = call.optimizer.state if call.optimizer is not None else {}
        held_of = {}  # tensor index -> its optimizer state: a dict keyed by tensors hashes in Python, so once
        out = list(map(tensors.__getitem__, self._tensor_run))
        out += map(leaves.__getitem__, self._arg_run)
        steps = self._steps
        for i in self._rest:
            step = steps[i]
            kind = step[0]
            if kind == TENSOR:
                out.append(tensors[step[1]])
            elif kind == ARG:
                out.append(leaves[step[1]])
            elif kind == STATE:  # existing state as it is; missing state is created by call.fetch
                held = held_of.get(step[1], _UNSEEN)
                if held is _UNSEEN:
                    held = held_of[step[1]] = state.get(tensors[step[1]])
                t = held.get(step[2]) if held is not None else None
                if t is None:
                    t = call.fetch(step[3], scalars)
                    held_of.pop(step[1])  # fetch created it
                out.append(t)
            elif kind == HYPER:
                value = call._hyper(step[1])[step[2]]
                if isinstance(value, torch.Tensor):  # a tensor lr or betas: its own dtype, refilled at every call
                    out.append(call.fetch(step[3], scalars))
                else:
                    out.append(self._scalar(i, step[3], value, torch.float64, scalars))
            elif kind == HAS_BUFFER:
                held = held_of.get(step[1], _UNSEEN)
                if held is _UNSEEN:
                    held = held_of[step[1]] = state.get(tensors[step[1]])
                has = held is not None and held.get(call.plan.lazy) is not None
                out.append(self._scalar(i, step[3], has, torch.bool, scalars))
            else:
                out.append(call.fetch(step[1], scalars))
        return out

    def _scalar(self, i: int, slot, value, dtype: torch.dtype, scalars: dict) -> torch.Tensor:
        filled = self._filled[i]
        if filled is not None and filled[1] == value and filled[0]._version == filled[2]:
            return filled[0]
        t = _scalar(scalars, slot, dtype).fill_(value)
        self._filled[i] = (t, value, t._version)
        return t


def _run_end(kinds: list[int], start: int, kind: int) -> int:
    """Where the run of `kind` starting at `start` ends."""
    end = start
    while end < len(kinds) and kinds[end] == kind:
        end += 1
    return end
