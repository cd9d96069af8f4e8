"""Fetching the inputs of a compiled variant at each call, with as little Python as possible.

The slots of a variant are fixed when it is compiled, so the way to get each one is chosen once (`FetchPlan`:
one small tuple per slot, read by position) rather than by an `isinstance` chain and dict lookups keyed by
slot objects (a dataclass's hash is a Python call) per slot and call. The bulk of the slots of a small model
are its parameters (as they are: the compiled step runs under no_grad), their optimizer state (as torch.optim
holds it, looked up once per parameter) and the groups' runtime scalars: those persistent 0-d tensors are
refilled only when the group's value changed since this plan last filled them and nothing else wrote them
since (their version counter says so), which is exact: the compiled step only reads them. Missing optimizer
state, gradients and tensor hyperparameters go through `StepCall.fetch`, which creates state the way torch.optim
would.
"""

from __future__ import annotations

from operator import attrgetter

import torch

from dualmode.graph.inputs import StepCall, _scalar
from dualmode.graph.layouts import LayoutCheck
from dualmode.graph.slots import ArgSlot, GradSlot, HasBufferSlot, HyperSlot, StateSlot, TensorSlot

TENSOR, ARG, HYPER, STATE, HAS_BUFFER, OTHER, PARAMETER_STATE, GROUP_HYPER = range(8)
_VERSION = attrgetter("_version")


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
        self._rest = _merged(list(enumerate(self._steps))[args_end:])
        self._last_hyper: dict[int, tuple] = {}  # per GROUP_HYPER step: (the values, their inputs, versions)
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
        out = list(map(tensors.__getitem__, self._tensor_run))
        out += map(leaves.__getitem__, self._arg_run)
        for i, step in self._rest:
            kind = step[0]
            if kind == PARAMETER_STATE:  # one parameter's state slots: its state looked up once (a Python hash)
                held = state.get(tensors[step[1]])
                for j, sub in step[2]:
                    if sub[0] == STATE:  # existing state as it is; missing state is created by call.fetch
                        t = held.get(sub[2]) if held is not None else None
                        if t is None:
                            t = call.fetch(sub[3], scalars)
                            held = state.get(tensors[step[1]])
                        out.append(t)
                    else:  # HAS_BUFFER: whether the state held the lazy buffer before this call
                        has = held is not None and held.get(call.plan.lazy) is not None
                        out.append(self._scalar(j, sub[3], has, torch.bool, scalars))
            elif kind == GROUP_HYPER:  # one group's runtime scalars
                values = call._hyper(step[1])
                last = self._last_hyper.get(i)
                if last is not None and last[0] is values and list(map(_VERSION, last[1])) == last[2]:
                    out += last[1]  # the very values of the last call (fastpath.py), in tensors nobody wrote since
                    continue
                filled = [self._hyper_input(j, sub, values, call, scalars) for j, sub in step[2]]
                out += filled
                if not any(isinstance(v, torch.Tensor) for v in values.values()):  # a tensor may change in place
                    self._last_hyper[i] = (values, filled, list(map(_VERSION, filled)))
            elif kind == TENSOR:
                out.append(tensors[step[1]])
            elif kind == ARG:
                out.append(leaves[step[1]])
            else:
                out.append(call.fetch(step[1], scalars))
        return out

    def _hyper_input(self, i: int, step: tuple, values: dict, call: StepCall, scalars: dict) -> torch.Tensor:
        value = values[step[2]]
        if isinstance(value, torch.Tensor):  # a tensor lr or betas: its own dtype, refilled at every call
            return call.fetch(step[3], scalars)
        return self._scalar(i, step[3], value, torch.float64, scalars)

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


def _merged(steps: list[tuple[int, tuple]]) -> list[tuple[int, tuple]]:
    """(position, step) pairs, with each run of one parameter's state slots (HAS_BUFFER, STATE: adjacent, as
    inputs.py lists them) merged into one PARAMETER_STATE step, and each run of one group's HYPER slots into one
    GROUP_HYPER step."""
    merged = []
    for i, step in steps:
        kind = PARAMETER_STATE if step[0] in (STATE, HAS_BUFFER) else GROUP_HYPER if step[0] == HYPER else None
        if kind is None:
            merged.append((i, step))
            continue
        last = merged[-1][1] if merged else None
        if last is not None and last[0] == kind and last[1] == step[1]:  # the same parameter, or group
            last[2].append((i, step))
        else:
            merged.append((i, (kind, step[1], [(i, step)])))
    return merged
