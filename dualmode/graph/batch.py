"""The batch dimension of a traced step: a symbol, so that a new batch size runs the same compiled graph.

The first dimension of every tensor argument of the call (size 2 or more) is traced as a symbol (make_fx's
symbolic tracing, only those dimensions; parameters, buffers and optimizer state stay static), so a
DataLoader's short last batch reuses the compiled step. Arguments of equal first size share one symbol, and
the cache key names that grouping instead of the sizes ("b0" for every leaf with the first leaf's size).

The trace may still fix the batch size (build() reshapes to a literal size) or assume something of it (an `if`
on it): both end up in the shape environment, and a variant whose batch got fixed is keyed on the concrete
sizes, while its other assumptions (guards) are checked once per new tuple of sizes.
"""

from __future__ import annotations

from types import SimpleNamespace

import sympy
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import (
    DimDynamic,
    ShapeEnv,
    StatelessSymbolicContext,
)

from dualmode.graph.slots import ArgSlot, InputSignature


class BatchDims:
    """Which leaves of one call's arguments get a symbolic first dimension, and the symbol each one shares."""

    def __init__(self, leaves: list, enabled: bool):
        self.labels: dict[int, int] = {}  # leaf index -> index of the first leaf of the same first size
        first_of_size: dict[int, int] = {}
        if enabled:
            for i, v in enumerate(leaves):
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] >= 2:
                    self.labels[i] = first_of_size.setdefault(v.shape[0], i)
        self.sizes = tuple(leaves[i].shape[0] for i in self.labels)

    def __bool__(self) -> bool:
        return bool(self.labels)

    def general(self, parts: dict) -> dict:
        """The key parts with each symbolic first size replaced by the label of its symbol ("b0", ...)."""
        if not self.labels:
            return parts
        spec, signatures = parts["inputs"]
        signatures = tuple(_labelled(s, f"b{self.labels[i]}") if i in self.labels else s
                           for i, s in enumerate(signatures))
        return {**parts, "inputs": (spec, signatures)}


def _labelled(signature: InputSignature, label: str) -> InputSignature:
    return signature._replace(shape=(label,) + tuple(signature.shape[1:]))


def fake_examples(slots: list, examples: list, batch: BatchDims):
    """Fake tensors to trace with: the symbolic leaves' first dimension dynamic, everything else static."""
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    fakes, symbols = [], {}
    for slot, t in zip(slots, examples):
        dynamic = isinstance(slot, ArgSlot) and slot.index in batch.labels
        if not dynamic:  # parameters, state, static arguments: plain sizes, without the symbolic machinery
            fakes.append(mode.from_tensor(t, static_shapes=True))
            continue
        sizes = [DimDynamic.DYNAMIC if d == 0 else DimDynamic.STATIC for d in range(t.dim())]
        fake = mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))
        # The symbol as created: the trace may later replace it by another one or a constant.
        symbols[slot.index] = sympy.sympify(fake.shape[0].node.expr if isinstance(fake.shape[0], torch.SymInt)
                                            else fake.shape[0])
        fakes.append(fake)
    return fakes, BatchGuard(env, symbols)


class BatchGuard:
    """What a trace assumed of the batch sizes: which got fixed, and the conditions the others must meet."""

    def __init__(self, env: ShapeEnv, symbols: dict):
        self.env, self.symbols = env, symbols
        self._checked: dict[tuple, bool] = {}

    def lasting(self) -> dict:
        """What `holds` checks, for a saved trace (saved_trace.py): symbols, conditions and ranges (sympy)."""
        return {"symbols": self.symbols, "guards": [g.expr for g in self.env.guards],
                "ranges": {s: self.env.var_to_range[s] for s in self.symbols.values() if s in self.env.var_to_range}}

    @classmethod
    def restored(cls, saved: dict) -> BatchGuard:
        """The guard of a saved trace: its conditions as `lasting()` gave them (no batch size fixed: not saved)."""
        env = SimpleNamespace(guards=[SimpleNamespace(expr=e) for e in saved["guards"]],
                              var_to_range=saved["ranges"], replace=lambda symbol: symbol)
        return cls(env, saved["symbols"])

    @property
    def fixed(self) -> list[int]:
        """Leaves whose first size the trace turned into a constant."""
        return [i for i, s in self.symbols.items() if isinstance(self.env.replace(s), sympy.Integer)]

    def holds(self, batch: BatchDims) -> bool:
        """Whether the trace's conditions on the batch sizes hold for this call's sizes (cached per sizes)."""
        ok = self._checked.get(batch.sizes)
        if ok is None:
            values = {self.symbols[i]: sympy.Integer(n) for i, n in zip(batch.labels, batch.sizes)}
            ok = all(self._true(g.expr, values) for g in self.env.guards)
            ok = ok and all(n in self.env.var_to_range[s] for s, n in values.items() if s in self.env.var_to_range)
            self._checked[batch.sizes] = ok
        return ok

    @staticmethod
    def _true(condition, values: dict) -> bool:
        condition = condition.xreplace(values)
        return condition.free_symbols == set() and bool(condition)
