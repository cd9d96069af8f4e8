"""How graph mode updates the parameters of one optimizer: its own step() traced (OwnStep), or a built-in rule.

Both plans give the input slots what they need (the runtime hyperparameters of a group, the switches baked
into the graph, each parameter's state and its initial value) and, while tracing, the update itself. The
optimizer's own step is the default for every optimizer, torch.optim's and the user's; a built-in rule of
updates.py is kept only where it does measurably better (benchmarks/optim_routes.py, results in
benchmarks/results/): SGD and RMSprop, whose torch step branches on `momentum` in Python, so a scheduler cycling
momentum (OneCycleLR) would recompile the traced step at every call, while the rule takes momentum as a runtime
tensor; SGD and Adam, whose rules' fastest steps were 3 to 9 times faster on the MLP and MobileNetV2 (torch's
`addcmul_(..., value=1 - beta2)` turns a tensor hyperparameter into a `.item()` inside the graph); Adagrad (the
same `value=` pattern, not measured); Adafactor, whose torch step is not traceable at all. The parity tests hold
every kept rule to torch.optim.
"""

from __future__ import annotations

import warnings
import weakref
from collections import defaultdict

import torch

from dualmode.graph import optim_trace, updates
from dualmode.graph.report import RecompileWarning
from dualmode.graph.rule_adafactor import ADAFACTOR
from dualmode.graph.slots import HasBufferSlot, HyperSlot, StateSlot

KEPT_RULES: dict[type, updates.UpdateRule] = {
    torch.optim.SGD: updates.SGD,  # momentum: a Python branch in torch's step; 3 to 9x faster steps (benchmark)
    torch.optim.RMSprop: updates.RMSPROP,  # momentum: a Python branch in torch's step
    torch.optim.Adam: updates.ADAM,  # 5x faster steps (benchmark): torch's `value=1 - beta2` is a .item()
    torch.optim.AdamW: updates.ADAM,
    torch.optim.Adagrad: updates.ADAGRAD,  # torch's `value=-clr` is a .item() in the graph, as Adam's
    torch.optim.Adafactor: ADAFACTOR,  # torch's step reads .item() of the parameter's norm: not traceable
}
NO_EFFECT = ("foreach", "fused")


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_for(optimizer: torch.optim.Optimizer):
    """The plan graph mode follows for `optimizer` (one per optimizer: it keeps what the last compile found out);
    TypeError naming it if graph mode cannot run it."""
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise TypeError("graph mode cannot run SparseAdam: it steps sparse gradients only, and the gradients of a "
                        "traced step are dense. Run this step with mode='eager' (embeddings with sparse=True).")
    rule = KEPT_RULES.get(type(optimizer))
    plan = _PLANS.get(optimizer)
    if plan is None or getattr(plan, "rule", None) is not rule:
        plan = _PLANS[optimizer] = BuiltinRule(optimizer, rule) if rule is not None else OwnStep(optimizer)
    return plan


def _no_effect_note(group: dict) -> str:
    set_on = [k for k in NO_EFFECT if group.get(k)]
    return f"; {', '.join(f'{k}=True' for k in set_on)}: no effect in graph mode (one compiled graph)" if set_on else ""


class BuiltinRule:
    """A hand-written rule of updates.py, held to torch.optim by the parity tests."""

    own_step = False

    def __init__(self, optimizer: torch.optim.Optimizer, rule: updates.UpdateRule):
        self.optimizer, self.rule, self.lazy = optimizer, rule, rule.lazy

    def hyper_names(self, group: dict) -> tuple[str, ...]:
        return ("lr",) + self.rule.hyper

    def hyper_values(self, group: dict) -> dict:
        return {"lr": group["lr"], **updates.hyper_values(self.rule, group)}

    def flags(self, group: dict):
        return self.rule.flags(group)

    def state(self, flags, p: torch.Tensor, group: dict) -> dict:
        return self.rule.state(flags, p, group)

    def prepare(self, groups: list[dict]) -> None:
        # torch's own step on copies, for its refusals only (capturable=True on CPU, a mid-run switch torch refuses)
        optim_trace.initial_state(self.optimizer, groups, _trained(groups))

    def describe(self, index: int, group: dict) -> str:
        return (f"group {index}: {type(self.optimizer).__name__}, built-in rule (dualmode/graph/updates.py, "
                f"checked against torch.optim){_no_effect_note(group)}")


class OwnStep:
    """The optimizer's own step(), traced with its hyperparameters as runtime tensors (optim_trace.py)."""

    own_step = True

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.name = type(optimizer).__name__
        self._initial: dict[int, dict] | None = None
        self.lazy_keys: tuple[str, ...] = ()
        self._warned = False

    @property
    def lazy(self) -> str | None:
        return self.lazy_keys[0] if self.lazy_keys else None

    def hyper_names(self, group: dict) -> tuple[str, ...]:
        return runtime_names(self.optimizer, group)

    def hyper_values(self, group: dict) -> dict:
        return {name: optim_trace.hyper_value(group, name) for name in self.hyper_names(group)}

    def flags(self, group: dict):
        return optim_trace.switches(self.optimizer, group, self.hyper_names(group))

    def prepare(self, groups: list[dict]) -> None:
        self._initial, self.lazy_keys = optim_trace.initial_state(self.optimizer, groups, _trained(groups))
        baked = [i for i, group in enumerate(groups) if "lr" not in self.hyper_names(group)]
        if baked and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.name}.step() cannot take a 0-d tensor lr (param groups {baked}): it uses the lr as a Python "
                "number (a comparison, min/max, an `if`), so graph mode bakes the lr into the compiled step and "
                "recompiles whenever it changes. To avoid this, compute with the lr as a tensor, e.g. "
                "torch.clamp(lr, max=c) rather than min(lr, c).", RecompileWarning, stacklevel=6)

    def state(self, flags, p: torch.Tensor, group: dict) -> dict:
        """The state tensors of `p` in the compiled step: those it holds, and those its first step creates."""
        if self._initial is None:
            self.prepare(self.optimizer.param_groups)
        held = self.optimizer.state.get(p, {})
        keys = [k for k, v in held.items() if isinstance(v, torch.Tensor)]
        created = self._initial.get(id(p), {})
        return {**{k: held[k] for k in keys}, **{k: v.clone() for k, v in created.items() if k not in held}}

    def describe(self, index: int, group: dict) -> str:
        runtime = ", ".join(self.hyper_names(group)) or "none"
        lazy = f"; state made from the first gradient: {', '.join(self.lazy_keys)}" if self.lazy_keys else ""
        return (f"group {index}: {self.name}, traced from its own step() (runtime hyperparameters: {runtime}"
                f"{lazy}){_no_effect_note(group)}")

    def writes(self, values: dict, members: list, stand_ins: list, grads: dict, in_place: bool) -> list:
        """(input, new value) pairs after one traced step: each parameter and each of its state tensors.

        With `in_place`, the step updates the inputs themselves, and a pair is left only where the step stored a
        new tensor (or where the lazy state's first step is picked); otherwise it runs on copies.
        """
        groups = self.optimizer.param_groups
        by_member = {ti: (gi, stand_ins[ti], grads[ti]) for gi, ti in members}
        hypers = {gi: {n: values[HyperSlot(gi, n)] for n in self.hyper_names(g)} for gi, g in enumerate(groups)}
        state = defaultdict(dict)
        for slot, value in values.items():
            if isinstance(slot, StateSlot) and slot.tensor in by_member:
                state[slot.tensor][slot.key] = value
        first = None
        if self.lazy_keys:  # the step as torch runs it when the lazy state does not exist yet (on copies, first)
            fresh = {ti: {k: v for k, v in s.items() if k not in self.lazy_keys} for ti, s in state.items()}
            first = optim_trace.run_step(self.optimizer, groups, by_member, hypers, fresh, traced=True)
        later = optim_trace.run_step(self.optimizer, groups, by_member, hypers, state, traced=True,
                                     in_place=in_place)
        first = first or later
        out = []
        for gi, ti in members:
            has = values[HasBufferSlot(gi, ti)] if self.lazy_keys else None
            new_p, new_state = later[ti]
            first_p, first_state = first[ti]
            unknown = sorted(set(new_state) - set(state[ti]))
            if unknown:
                raise RuntimeError(f"{self.name}.step() created state {unknown} while graph mode traced it, after "
                                   "its state was created: graph mode cannot run an optimizer whose state keys "
                                   "change from step to step; run it with mode='eager'")
            out.append((stand_ins[ti], _pick(has, new_p, first_p)))
            out += [(dst, _pick(has, new_state[k], first_state[k])) for k, dst in state[ti].items()]
        return [(dst, new) for dst, new in out if new is not dst]


def _pick(has, later: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    return later if has is None else torch.where(has, later, first)


def _trained(groups: list[dict]) -> list[tuple[int, torch.Tensor]]:
    return [(gi, p) for gi, g in enumerate(groups) for p in g["params"] if p.requires_grad]


_RUNTIME: dict[tuple, tuple[str, ...]] = {}


def runtime_names(optimizer: torch.optim.Optimizer, group: dict) -> tuple[str, ...]:
    """optim_trace.runtime_names, cached by what it depends on: the class, the settings, the kinds of params."""
    def kind(v):
        if isinstance(v, tuple):
            return tuple(kind(x) for x in v)
        return ("float", v.dtype if isinstance(v, torch.Tensor) else None) if optim_trace._is_float(v) else repr(v)

    settings = tuple((k, kind(group.get(k))) for k in optimizer.defaults if k not in optim_trace.NOT_THE_OPTIMIZERS)
    params = tuple(sorted({(p.dim(), str(p.dtype)) for p in group["params"] if p.requires_grad}))
    key = (type(optimizer), settings, params)
    if key not in _RUNTIME:
        _RUNTIME[key] = optim_trace.runtime_names(optimizer, group, 0)
    return _RUNTIME[key]
