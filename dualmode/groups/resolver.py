"""The resolver: rules -> parameter groups that any ``torch.optim`` optimizer accepts.

A rule is a dict: ``"params"`` (a selector) plus optimizer hyperparameters and an optional ``lr_scale``.
Each trainable parameter goes to the first rule that selects it; the rest go to one last group built from
``default``. Every group carries ``params``, ``names`` (qualified names), ``lr_scale`` and ``rule`` (the
rule's index, or ``"default"``). See ``docs/param_groups.md``.
"""

from __future__ import annotations

import warnings

from torch import nn

from dualmode.groups.checks import check_hyper, check_layer_args, check_no_weight_decay, check_rules
from dualmode.groups.selectors import ParamIndex, few, nothing_message, select
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

    index = ParamIndex(bare_model(model))
    notes = []  # (message, tail when only warned) pairs, given once everything is resolved
    chosen, owner = [], {}
    for i, (selector, _, _) in enumerate(checked):
        selection = select(selector, index, f"rule {i}", notes)
        got = [k for k in selection.keys if k in index.trainable and k not in owner]
        if not got:
            notes.append((nothing_message(f"rule {i}", selection, index, owner), _KEPT))
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
        selection = select(selector, index, f"layer {j}", notes)
        got = [k for k in selection.keys if k in index.trainable and k not in layer_of]
        if not got:
            notes.append((nothing_message(f"layer {j}", selection, index,
                                           {k: f"layer {v}" for k, v in layer_of.items()}), ""))
        layer_of.update((k, j) for k in got)
    missing = [index.name[k] for k in index.trainable if k not in layer_of]
    if missing:
        raise ValueError(f"layers: trainable parameters {few(map(repr, missing))} are in no layer; add them "
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
