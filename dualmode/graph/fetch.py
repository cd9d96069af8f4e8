"""Fetching the inputs of a compiled variant at each call, with as little Python as possible.

The slots of a variant are fixed when it is compiled, so the way to get each one is chosen once (`FetchPlan`)
rather than by an `isinstance` chain per slot and call. The bulk of the slots of a small model are its
parameters (a detached alias each, as before) and the groups' runtime scalars: those persistent 0-d tensors
are refilled only when the group's value changed since this plan last filled them and nothing else wrote
them since (their version counter says so), which is exact: the compiled step only reads them. Optimizer state,
gradients and flags go through `StepCall.fetch`, which creates state the way torch.optim would.
"""

from __future__ import annotations

import torch

from dualmode.graph.inputs import StepCall, _scalar
from dualmode.graph.slots import ArgSlot, HyperSlot, TensorSlot


class FetchPlan:
    """How to get each input of one compiled variant, in order."""

    def __init__(self, slots: list):
        self.slots = slots
        self._last: dict[HyperSlot, tuple] = {}  # (value, tensor, version) as this plan last filled each scalar

    def inputs(self, call: StepCall, scalars: dict) -> list[torch.Tensor]:
        tensors, is_param, leaves = call.tensors.tensors, call.tensors.is_param, call.leaves
        out = []
        for slot in self.slots:
            kind = type(slot)
            if kind is TensorSlot:
                t = tensors[slot.index]
                out.append(t.detach() if is_param[slot.index] else t)
            elif kind is ArgSlot:
                out.append(leaves[slot.index])
            elif kind is HyperSlot:
                out.append(self._hyper(call, slot, scalars))
            else:
                out.append(call.fetch(slot, scalars))
        return out

    def _hyper(self, call: StepCall, slot: HyperSlot, scalars: dict) -> torch.Tensor:
        value = call._hyper(slot.group)[slot.name]
        if isinstance(value, torch.Tensor):  # a tensor lr or betas: its own dtype, refilled at every call
            return call.fetch(slot, scalars)
        t = scalars.get(slot)
        if t is None or self._last.get(slot) != (value, id(t), t._version):
            t = _scalar(scalars, slot, torch.float64).fill_(value)
            self._last[slot] = (value, id(t), t._version)
        return t
