"""Selectors: which parameters a rule's "params" picks (module, parameter, iterable, glob, callable)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


class ParamIndex:
    """The model's parameters by identity: first qualified name, every name, model order."""

    def __init__(self, model):
        self.model = model
        self.param, self.name = {}, {}
        for name, p in model.named_parameters():  # one entry per tensor, under its first name
            self.param[id(p)], self.name[id(p)] = p, name
        self.aliases = {k: [] for k in self.param}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.aliases[id(p)].append(name)
        self.order = list(self.param)
        self.trainable = {k: None for k in self.order if self.param[k].requires_grad}  # ordered set

    def key(self, tensor, where, label, what):
        """The key of ``tensor``, or a ValueError naming it when it is not a parameter of the model."""
        if id(tensor) in self.param:
            return id(tensor)
        buffer = next((n for n, b in self.model.named_buffers() if b is tensor), None)
        why = f"it is the model's buffer {buffer!r}" if buffer else "only the model's own parameters can be grouped"
        raise ValueError(f"{where} ({label}): {what} is not a parameter of the model ({why})")

    def matching(self, patterns):
        """Keys, in model order, of the parameters with a name (any alias) matching one of ``patterns``."""
        return [k for k in self.order
                if any(fnmatch.fnmatchcase(a, p) for a in self.aliases[k] for p in patterns)]


@dataclass
class Selection:
    keys: list  # selected parameters (frozen ones too), in model order
    label: str  # short description of the selector, for messages
    hint: str  # why it selected nothing, when it did


def select(selector, index, where, notes):
    """Resolve one selector into a Selection; raise TypeError/ValueError naming ``where``."""
    if isinstance(selector, str):
        return select_globs([selector], index, repr(selector), where, notes)
    if isinstance(selector, nn.Module):
        name = next((n for n, m in index.model.named_modules() if m is selector), None)
        label = "the model" if name == "" else f"module {name!r}" if name else f"{type(selector).__name__} module"
        keys = {index.key(p, where, label, f"its parameter {n!r} of shape {tuple(p.shape)}"): None
                for n, p in selector.named_parameters()}
        return Selection(in_order(keys, index), label, "the module has no parameters")
    if isinstance(selector, torch.Tensor):
        label = f"tensor of shape {tuple(selector.shape)}"
        key = index.key(selector, where, label, "the tensor")
        return Selection([key], f"parameter {index.name[key]!r}", "")
    if isinstance(selector, (set, frozenset)):
        raise TypeError(f"{where}: a set is unordered, so the group order would change from run to run; "
                        f"pass a list or tuple")
    if isinstance(selector, Mapping):
        raise TypeError(f"{where}: a dict is not a selector; pass a list of its values or of its keys")
    if isinstance(selector, type):
        raise TypeError(f"{where}: the class {selector.__name__} is not a selector; pass modules, or a "
                        f"callable such as lambda name, p: ...")
    if callable(selector):
        return select_callable(selector, index, where)
    if isinstance(selector, Iterable):
        return select_items(selector, index, where, notes)
    raise TypeError(f"{where}: unknown selector type {type(selector).__name__}; use a module, a parameter, a "
                    f"list of parameters or modules, a glob, a list of globs or a callable (name, param) -> bool")


def select_items(selector, index, where, notes):
    one_shot = iter(selector) is selector
    items = list(selector)
    if items and all(isinstance(item, str) for item in items):
        return select_globs(items, index, _short(repr(items)), where, notes)
    label = f"{type(selector).__name__} of {len(items)} items"
    keys = {}
    for j, item in enumerate(items):
        if isinstance(item, nn.Module):
            keys.update((index.key(p, where, label, f"element {j}'s parameter {n!r}"), None)
                        for n, p in item.named_parameters())
        elif isinstance(item, torch.Tensor):
            keys[index.key(item, where, label, f"element {j} (a tensor of shape {tuple(item.shape)})")] = None
        else:
            pairs = isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            hint = " (from named_parameters()? pass parameters() or the names)" if pairs else ""
            raise TypeError(f"{where} ({label}): element {j} is a {type(item).__name__}{hint}; a list selector "
                            f"holds Parameters and Modules, or only glob strings")
    hint = ("it yielded nothing (a generator such as model.parameters() can be read only once; pass a list)"
            if one_shot else "it is empty")
    return Selection(in_order(keys, index), label, hint)


def select_globs(patterns, index, label, where, notes):
    keys = index.matching(patterns)
    if keys and len(patterns) > 1:
        notes.extend((f"{where} ({label}): glob {p!r} matches no parameter name", "")
                     for p in patterns if not index.matching([p]))
    example = ", ".join(repr(index.name[k]) for k in index.order[:3])
    return Selection(keys, label, f"no parameter name matches (names look like {example})")


def select_callable(selector, index, where):
    label = f"callable {_short(getattr(selector, '__name__', type(selector).__name__))}"
    keys = {}
    for name, p in index.model.named_parameters(remove_duplicate=False):
        if id(p) in keys:
            continue
        try:
            picked = selector(name, p)
        except Exception as error:
            error.add_note(f"while {where}'s selector ({label}) looked at {name!r}")
            raise
        if not isinstance(picked, bool):
            raise TypeError(f"{where} ({label}): returned {type(picked).__name__} for {name!r}; a selector "
                            f"callable must return True or False")
        if picked:
            keys[id(p)] = None
    return Selection(in_order(keys, index), label, "the callable returned False for every parameter")


def nothing_message(where, selection, index, owner):
    """Why a rule or layer got no trainable parameter; ``owner`` maps taken keys to who took them."""
    if not selection.keys:
        return f"{where} ({selection.label}) selects no parameter: {selection.hint}"
    frozen = [repr(index.name[k]) for k in selection.keys if k not in index.trainable]
    taken = [f"{index.name[k]!r} ({owner[k]})" for k in selection.keys if k in owner]
    reasons = [f"{what}: {few(names)}" for what, names in [("frozen (requires_grad=False)", frozen),
                                                            ("taken by earlier ones (first match wins)", taken)]
               if names]
    return f"{where} ({selection.label}) selects no trainable parameter; {'; '.join(reasons)}"


def few(items, most=3):
    items = list(items)
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def _short(text, width=40):
    return text if len(text) <= width else text[: width - 3] + "..."


def in_order(keys, index):
    return [k for k in index.order if k in keys]
