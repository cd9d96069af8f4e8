"""The resolver: rules -> parameter groups that any ``torch.optim`` optimizer accepts.

A rule is a dict: ``"params"`` (a selector) plus optimizer hyperparameters and an optional ``lr_scale``.
Each trainable parameter goes to the first rule that selects it; the rest go to one last group built from
``default``. Every group carries ``params``, ``names`` (qualified names), ``lr_scale`` and ``rule`` (the
rule's index, or ``"default"``). See ``docs/param_groups.md``.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dualmode.groups.checks import check_hyper, check_layer_args, check_no_weight_decay, check_rules
from dualmode.groups.unwrap import bare_model

_KEPT = "; its group is kept, empty, so that groups line up with the rules"


def param_groups(model, rules=(), *, default=None, no_weight_decay=False, layer_decay=None, layers=None,
                 strict=False):
    """Resolve rules into parameter groups for a ``torch.optim`` optimizer.

    Args:
        model: the ``nn.Module`` whose parameters are grouped, seen through DDP and torch.compile wrappers
            (names are ``"fc2.*"``, not ``"module.fc2.*"``). Frozen parameters go to no group.
        rules: a sequence of dicts, each with ``"params"`` (a selector) and any optimizer hyperparameters
            (``lr``, ``weight_decay``, ``betas``, ...) and optionally ``lr_scale`` (default 1.0). A selector is
            an ``nn.Module``, an ``nn.Parameter``, a list/tuple/generator of Parameters or Modules, a glob
            over qualified names (``"fc2.*"``) or a list of globs, or a callable ``(name, param) -> bool``.
            Each parameter goes to the first rule that selects it; each rule gives its group(s) in rule
            order, even when it selected nothing.
        default: hyperparameters (and ``lr_scale``) of the last group, which holds the parameters that no
            rule selected; that group is left out when no such parameter exists.
        no_weight_decay: ``True`` gives ``weight_decay=0.0`` to 1-D (and 0-D) parameters; a glob or a list
            of globs does the same for matching names. It splits a rule's group in a decay and a no-decay
            piece.
        layer_decay: ``d`` multiplies ``lr_scale`` by ``d ** (L - 1 - i)``, ``i`` being the index of the
            parameter's layer among ``L`` layers. The layers are the model's top-level children that hold
            trainable parameters, in registration order, unless ``layers`` names them.
        layers: with ``layer_decay``, the layers from first (most decayed) to last: a sequence of selectors,
            first match wins, every trainable parameter must be in one.
        strict: turn every warning (a rule or layer that selects nothing, a glob that matches no name) into
            a ``ValueError``.

    Returns:
        A new list of group dicts, each with ``params``, ``names``, the rule's hyperparameters, ``lr_scale``
        and ``rule`` (the rule's index, or ``"default"``); not torch's own ``param_names``. A rule's group may
        be split by ``no_weight_decay`` and ``layer_decay``; its pieces stay in the rule's place, ordered by
        layer and then decay before no-decay. Within a group the parameters follow the model's order.

    Raises:
        ValueError: a tensor that is not a parameter of ``model``, an ``lr_scale`` or ``layer_decay`` that
            is not a finite positive number, a reserved key (``names``, ``rule``, ``param_names``) in a rule,
            a trainable parameter in none of ``layers``, or, with ``strict=True``, a warning.
        TypeError: a selector of unknown type, a ``set``, or a rule that is not a dict.

    Example:
        >>> from torch import nn
        >>> from dualmode import param_groups
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> groups = param_groups(model, [{"params": "2.*", "lr_scale": 10.0}], default={"lr_scale": 1.0})
        >>> [(g["names"], g["lr_scale"]) for g in groups]
        [(['2.weight', '2.bias'], 10.0), (['0.weight', '0.bias'], 1.0)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    checked = check_rules(rules)
    default_hyper, default_scale = check_hyper({} if default is None else default, "default", has_params=False)
    no_decay_globs = check_no_weight_decay(no_weight_decay)
    check_layer_args(layer_decay, layers)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")

    index = _Index(bare_model(model))
    notes = []  # (message, tail when only warned) pairs, given once everything is resolved
    chosen, owner = [], {}
    for i, (selector, _, _) in enumerate(checked):
        selection = _select(selector, index, f"rule {i}", notes)
        got = [k for k in selection.keys if k in index.trainable and k not in owner]
        if not got:
            notes.append((_nothing_message(f"rule {i}", selection, index, owner), _KEPT))
        owner.update((k, f"rule {i}") for k in got)
        chosen.append(got)
    rest = [k for k in index.trainable if k not in owner]
    layer_of, n_layers = _layers(index, layer_decay, layers, notes)
    no_decay = _no_decay(index, no_weight_decay, no_decay_globs, notes)

    if notes and strict:
        raise ValueError("\n".join(message for message, _ in notes))
    for message, tail in notes:
        warnings.warn(message + tail, UserWarning, stacklevel=2)

    def pieces(keys, hyper, scale, rule):
        buckets = {}
        for k in keys:
            buckets.setdefault((layer_of.get(k, 0), k in no_decay), []).append(k)
        out = []
        for layer, is_no_decay in sorted(buckets):  # by layer, then decay (False) before no-decay (True)
            piece_scale = scale if layer_decay is None else scale * layer_decay ** (n_layers - 1 - layer)
            out.append(_group(index, buckets[layer, is_no_decay], hyper, piece_scale, rule, is_no_decay))
        return out or [_group(index, [], hyper, scale, rule, False)]

    groups = []
    for i, ((_, hyper, scale), keys) in enumerate(zip(checked, chosen)):
        groups += pieces(keys, hyper, scale, i)
    if rest:
        groups += pieces(rest, default_hyper, default_scale, "default")
    return groups


class _Index:
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
class _Selection:
    keys: list  # selected parameters (frozen ones too), in model order
    label: str  # short description of the selector, for messages
    hint: str  # why it selected nothing, when it did


def _select(selector, index, where, notes):
    """Resolve one selector into a _Selection; raise TypeError/ValueError naming ``where``."""
    if isinstance(selector, str):
        return _select_globs([selector], index, repr(selector), where, notes)
    if isinstance(selector, nn.Module):
        name = next((n for n, m in index.model.named_modules() if m is selector), None)
        label = "the model" if name == "" else f"module {name!r}" if name else f"{type(selector).__name__} module"
        keys = {index.key(p, where, label, f"its parameter {n!r} of shape {tuple(p.shape)}"): None
                for n, p in selector.named_parameters()}
        return _Selection(_in_order(keys, index), label, "the module has no parameters")
    if isinstance(selector, torch.Tensor):
        label = f"tensor of shape {tuple(selector.shape)}"
        key = index.key(selector, where, label, "the tensor")
        return _Selection([key], f"parameter {index.name[key]!r}", "")
    if isinstance(selector, (set, frozenset)):
        raise TypeError(f"{where}: a set is unordered, so the group order would change from run to run; "
                        f"pass a list or tuple")
    if isinstance(selector, Mapping):
        raise TypeError(f"{where}: a dict is not a selector; pass a list of its values or of its keys")
    if isinstance(selector, type):
        raise TypeError(f"{where}: the class {selector.__name__} is not a selector; pass modules, or a "
                        f"callable such as lambda name, p: ...")
    if callable(selector):
        return _select_callable(selector, index, where)
    if isinstance(selector, Iterable):
        return _select_items(selector, index, where, notes)
    raise TypeError(f"{where}: unknown selector type {type(selector).__name__}; use a module, a parameter, a "
                    f"list of parameters or modules, a glob, a list of globs or a callable (name, param) -> bool")


def _select_items(selector, index, where, notes):
    one_shot = iter(selector) is selector
    items = list(selector)
    if items and all(isinstance(item, str) for item in items):
        return _select_globs(items, index, _short(repr(items)), where, notes)
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
    return _Selection(_in_order(keys, index), label, hint)


def _select_globs(patterns, index, label, where, notes):
    keys = index.matching(patterns)
    if keys and len(patterns) > 1:
        notes.extend((f"{where} ({label}): glob {p!r} matches no parameter name", "")
                     for p in patterns if not index.matching([p]))
    example = ", ".join(repr(index.name[k]) for k in index.order[:3])
    return _Selection(keys, label, f"no parameter name matches (names look like {example})")


def _select_callable(selector, index, where):
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
    return _Selection(_in_order(keys, index), label, "the callable returned False for every parameter")


def _nothing_message(where, selection, index, owner):
    """Why a rule or layer got no trainable parameter; ``owner`` maps taken keys to who took them."""
    if not selection.keys:
        return f"{where} ({selection.label}) selects no parameter: {selection.hint}"
    frozen = [repr(index.name[k]) for k in selection.keys if k not in index.trainable]
    taken = [f"{index.name[k]!r} ({owner[k]})" for k in selection.keys if k in owner]
    reasons = [f"{what}: {_few(names)}" for what, names in [("frozen (requires_grad=False)", frozen),
                                                            ("taken by earlier ones (first match wins)", taken)]
               if names]
    return f"{where} ({selection.label}) selects no trainable parameter; {'; '.join(reasons)}"


def _layers(index, layer_decay, layers, notes):
    """Map each trainable parameter to its layer index; return (mapping, number of layers)."""
    if layer_decay is None:
        return {}, 1
    if layers is None:
        children = {}
        for k in index.trainable:
            child, dot, _ = index.name[k].partition(".")
            if not dot:
                raise ValueError(f"layer_decay: parameter {index.name[k]!r} is registered on the model itself, "
                                 f"not in a top-level child; name the layers with layers=[...]")
            children.setdefault(child, []).append(k)
        order = [c for c, _ in index.model.named_children() if c in children]
        return {k: i for i, c in enumerate(order) for k in children[c]}, len(order)
    layer_of = {}
    for j, selector in enumerate(layers):
        selection = _select(selector, index, f"layer {j}", notes)
        got = [k for k in selection.keys if k in index.trainable and k not in layer_of]
        if not got:
            notes.append((_nothing_message(f"layer {j}", selection, index,
                                           {k: f"layer {v}" for k, v in layer_of.items()}), ""))
        layer_of.update((k, j) for k in got)
    missing = [index.name[k] for k in index.trainable if k not in layer_of]
    if missing:
        raise ValueError(f"layers: trainable parameters {_few(map(repr, missing))} are in no layer; add them "
                         f"to one (a last '*' takes the rest)")
    return layer_of, len(layers)


def _no_decay(index, no_weight_decay, globs, notes):
    """The keys of the parameters that get weight_decay=0.0."""
    if no_weight_decay is True:
        return {k for k in index.trainable if index.param[k].ndim <= 1}
    notes.extend((f"no_weight_decay: glob {p!r} matches no parameter name", "") for p in globs
                 if not index.matching([p]))
    return set(index.matching(globs))


def _group(index, keys, hyper, scale, rule, no_decay):
    group = {"params": [index.param[k] for k in keys], "names": [index.name[k] for k in keys], **hyper}
    if no_decay:
        group["weight_decay"] = 0.0
    group["lr_scale"] = float(scale)
    group["rule"] = rule
    return group


def _in_order(keys, index):
    return [k for k in index.order if k in keys]


def _few(items, most=3):
    items = list(items)
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def _short(text, width=40):
    return text if len(text) <= width else text[: width - 3] + "..."
