"""The steady-state call: tell in a few microseconds that this call is like the last one of its phase.

Building a `StepCall` walks every module with `named_parameters()` and its cache key hashes a tuple of
signatures: about 150 to 300 us per call for a small model, as much as the compiled step itself. Once a
variant has run, `LastCall` keeps what that call was made of (the modules of the tree and the dicts that hold
their children, parameters and buffers, each tensor's layout, the arguments' layout, the config, each param
group's parameters, switches, lr_scale, clip and hyperparameter kinds) and compares the next call with it,
by identity where it can and by value where it must. Anything different, and the call takes the full path
(which finds or compiles its variant and names the change); the same, and it reuses the walk and the variant.
What build() read from Python is not part of this: the variant's own guard checks that at every call.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter, is_

import torch

from dualmode.graph.guards import IMMUTABLE
from dualmode.graph.inputs import StepCall, config_values, group_settings
from dualmode.graph.layouts import LayoutCheck

_GRAD_FN = attrgetter("grad_fn")
_TRAINING = attrgetter("training")


def _plain(args: tuple, kwargs: dict) -> bool:
    """Tensors only, as positional arguments: the usual call, whose structure is its length."""
    return not kwargs and all(type(a) is torch.Tensor for a in args)


def _same(a, b) -> bool:
    """The same objects in the same order (identity: a tensor's == would compare values)."""
    return len(a) == len(b) and all(map(is_, a, b))


def _config_values(config) -> tuple:
    values = config_values(config)
    return values[:-1] + (dict(values[-1]),)  # a copy of compile_options: the dict may be changed in place


def _immutable(value) -> bool:
    return isinstance(value, IMMUTABLE) or (type(value) is tuple and all(isinstance(x, IMMUTABLE) for x in value))


def _entries(group: dict) -> tuple[tuple, tuple | None, tuple]:
    """The group's keys (params too), their values, and a copy of each list of immutable values in them (a
    resolver's `names`, a list of betas), by key.

    Immutable is what the guard compares by value (guards.IMMUTABLE). A list can change in place, which identity
    would not tell: its copy is compared by value (the params list is compared apart, by identity of its items).
    None for the values if one of them is neither (a tensor, a list holding one): such a group's settings are
    recomputed at every call."""
    keys, values = tuple(group), tuple(group.values())
    lists = tuple((k, tuple(v)) for k, v in zip(keys, values)
                  if k != "params" and type(v) is list and all(map(_immutable, v)))
    listed = {k for k, _ in lists}
    if not all(_immutable(v) for k, v in zip(keys, values) if k not in listed and k != "params"):
        return keys, None, ()
    return keys, values, lists


def _unchanged(group: dict, keys: tuple, held: tuple | None, lists: tuple) -> bool:
    """The group holds exactly these entries, the very same objects in the same order, and its lists the same
    values (keys and values compared by identity in C, without a lookup per key)."""
    return (held is not None and len(group) == len(keys) and all(map(is_, group, keys))
            and all(map(is_, group.values(), held)) and all(tuple(group[k]) == copy for k, copy in lists))


class LastCall:
    """What one successful call of a phase was made of, and the variant it ran."""

    def __init__(self, call: StepCall, compiled, args: tuple, kwargs: dict):
        self.call, self.compiled = call, compiled
        self.plain = _plain(args, kwargs)
        self.roots = list(call.modules)
        self.tree = list(dict.fromkeys(m for _, root in self.roots for m in root.modules()))
        self.training = list(map(_TRAINING, self.tree))
        # Each module's dicts of children, parameters and buffers: their sizes, and what they held in one row.
        self.dicts = [d for m in self.tree for d in (m._modules, m._parameters, m._buffers)]
        self.sizes = list(map(len, self.dicts))
        self.filled = [d for d in self.dicts if d]  # most are empty: their sizes say all
        self.held = list(chain.from_iterable(map(dict.values, self.filled)))
        self.tensors = call.tensors.tensors
        # Parameters, buffers and arguments in one check; and whether each argument came out of autograd.
        self.layouts = LayoutCheck([*self.tensors, *call.leaves]) if self.plain else None
        self.grad_fns = list(map(_GRAD_FN, call.leaves)) if self.plain else None
        self.config = _config_values(call.step.config)
        self.optimizer = call.optimizer
        self.groups = None
        if call.optimizer is not None:
            groups = call.optimizer.param_groups
            self.group_params = [list(g["params"]) for g in groups]
            self.entries = list(map(_entries, groups))
            self.groups, hypers = zip(*(group_settings(call.plan, g) for g in groups))
            self.hypers = list(hypers)

    def reuse(self, step, phase: str, args: tuple, kwargs: dict) -> StepCall | None:
        """This call as a StepCall that reuses the last one's walk, or None if anything differs from it."""
        if not (self.plain and _plain(args, kwargs)):
            return None  # the full path keys on constants and structure
        if step.modules != self.roots:  # (name, module) pairs: names by value, modules by identity
            return None
        if list(map(_TRAINING, self.tree)) != self.training:
            return None
        if list(map(len, self.dicts)) != self.sizes or not all(
                map(is_, chain.from_iterable(map(dict.values, self.filled)), self.held)):
            return None
        leaves = list(args)
        if not self.layouts.same([*self.tensors, *leaves]) or list(map(_GRAD_FN, leaves)) != self.grad_fns:
            return None
        if config_values(step.config) != self.config or step.optimizer is not self.optimizer:  # dicts by value
            return None
        hyper = {}
        if self.optimizer is not None:
            groups = self.optimizer.param_groups
            if len(groups) != len(self.groups):
                return None
            for gi, group in enumerate(groups):
                if not _same(group["params"], self.group_params[gi]):
                    return None
                if _unchanged(group, *self.entries[gi]):  # the same objects under the same keys: nothing to recompute
                    hyper[gi] = self.hypers[gi]
                    continue
                now, hyper[gi] = group_settings(self.call.plan, group)  # a scheduler's new lr, say
                if now != self.groups[gi]:
                    return None
                # The same baked settings: from now on compared with these entries (an epoch's lr, say).
                self.entries[gi], self.hypers[gi] = _entries(group), hyper[gi]
        return self.call.again(step, phase, leaves, hyper)
