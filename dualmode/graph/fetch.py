"""Fetching the inputs of a compiled variant at each call, with as little Python as possible.

The slots of a variant are fixed when it is compiled, so the way to get each one is chosen once (`FetchPlan`:
one small tuple per slot, read by position) rather than by an `isinstance` chain and dict lookups keyed by
slot objects (a dataclass's hash is a Python call) per slot and call. The bulk of the slots of a small model
are its parameters (as they are: the compiled step runs under no_grad), their optimizer state (as torch.optim
holds it, looked up once per parameter) and the groups' runtime scalars: those persistent 0-d tensors are
refilled only when the group's value changed since this plan last filled them and nothing else wrote them
since (their version counter says so), which is exact: the compiled step only reads them. Missing optimizer
state, gradients and tensor hyperparameters go through `StepCall.fetch`, which creates state the way torch.optim
would. In steady calls even that loop is skipped: `_Steady` hands on the last call's inputs after the arguments
while everything they were read from is the very same object.
"""

from __future__ import annotations

from operator import attrgetter, is_

import torch

from dualmode.graph.inputs import StepCall, _scalar
from dualmode.graph.layouts import LayoutCheck
from dualmode.graph.slots import ArgSlot, GradSlot, HasBufferSlot, HyperSlot, StateSlot, TensorSlot

TENSOR, ARG, HYPER, STATE, HAS_BUFFER, OTHER, PARAMETER_STATE, GROUP_HYPER = range(8)
_VERSION = attrgetter("_version")
_NO_STATE: dict = {}  # an eval step's optimizer state: none (only read)


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
        self._steady: _Steady | None = None  # the last call's inputs after the arguments

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
        state = call.optimizer.state if call.optimizer is not None else _NO_STATE
        out = list(map(tensors.__getitem__, self._tensor_run))
        out += map(leaves.__getitem__, self._arg_run)
        if self._steady is not None and self._steady.holds(call, state):
            out += self._steady.rest
            return out
        rest, looked_up, hypers, made = [], [], [], []  # what the rest was made of, for the next call's `_Steady`
        for i, step in self._rest:
            kind = step[0]
            if kind == PARAMETER_STATE:  # one parameter's state slots: its state looked up once (a Python hash)
                held = state.get(tensors[step[1]])
                for j, sub in step[2]:
                    if sub[0] == STATE:  # existing state as it is; missing state is created by call.fetch
                        t = held.get(sub[2]) if held is not None else None
                        if t is None:
                            t = call.fetch(sub[3], scalars)
                            held, looked_up = state.get(tensors[step[1]]), None
                        elif looked_up is not None:
                            looked_up.append((held, sub[2], t))
                        rest.append(t)
                    else:  # HAS_BUFFER: whether the state held the lazy buffer before this call
                        has = held is not None and held.get(call.plan.lazy) is not None
                        if looked_up is not None and held is not None:
                            looked_up.append((held, call.plan.lazy, held.get(call.plan.lazy)))
                        made.append(self._scalar(j, sub[3], has, torch.bool, scalars))
                        rest.append(made[-1])
            elif kind == GROUP_HYPER:  # one group's runtime scalars
                values = call._hyper(step[1])
                if hypers is not None:
                    hypers.append((step[1], values))
                last = self._last_hyper.get(i)
                if last is not None and last[0] is values and list(map(_VERSION, last[1])) == last[2]:
                    rest += last[1]  # the very values of the last call (fastpath.py), in tensors nobody wrote since
                    made += last[1]
                    continue
                filled = [self._hyper_input(j, sub, values, call, scalars) for j, sub in step[2]]
                rest += filled
                made += filled
                if not any(isinstance(v, torch.Tensor) for v in values.values()):  # a tensor may change in place
                    self._last_hyper[i] = (values, filled, list(map(_VERSION, filled)))
                else:
                    hypers = None
            else:  # a gradient, or another input fetched at every call
                looked_up = None
                rest.append(tensors[step[1]] if kind == TENSOR else leaves[step[1]] if kind == ARG
                            else call.fetch(step[1], scalars))
        self._steady = (_Steady(call, state, looked_up, hypers, rest, made)
                        if looked_up is not None and hypers is not None else None)
        out += rest
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


class _Steady:
    """The inputs after the arguments as the last call fetched them, and a cheap test that they still are.

    They are the very objects the full loop would find again while: the parameters are the same list (a reused
    walk, fastpath.py), the optimizer's state dict is the same object holding the same parameters' state dicts
    in the same order (keys and values compared by identity in C: no tensor hash), every state tensor and lazy
    buffer is still the one in its dict, each group's hyperparameter values are the very dict the last call used
    (fastpath.py hands the same one on while the group is unchanged), and no runtime scalar was written since.
    """

    def __init__(self, call: StepCall, state: dict, looked_up: list, hypers: list, rest: list, made: list):
        self.rest, self.made, self.versions = rest, made, list(map(_VERSION, made))
        self.params, self.state, self.plan = call.tensors.tensors, state, call.plan
        self.keys, self.held = list(state), list(state.values())
        self.dicts = [d for d, _, _ in looked_up]
        self.names = [name for _, name, _ in looked_up]
        self.found = [t for _, _, t in looked_up]
        self.groups, self.values = [gi for gi, _ in hypers], [values for _, values in hypers]
        self.plain = all(type(d) is dict for d in self.held)  # dict.get reads a plain dict as .get would

    def holds(self, call: StepCall, state: dict) -> bool:
        return (self.plain and call.tensors.tensors is self.params and state is self.state and call.plan is self.plan
                and len(state) == len(self.keys) and all(map(is_, state, self.keys))
                and all(map(is_, state.values(), self.held))
                and all(map(is_, map(dict.get, self.dicts, self.names), self.found))
                and all(map(is_, map(call._hyper, self.groups), self.values))
                and list(map(_VERSION, self.made)) == self.versions)


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
