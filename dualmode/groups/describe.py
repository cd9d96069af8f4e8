"""describe(): what a parameter grouping does, as a plain table."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dualmode.groups.unwrap import bare_model

_HEADERS = ("group", "rule", "tensors", "elements", "lr", "lr_scale", "effective lr", "weight decay", "names")
_RIGHT = {"tensors", "elements", "lr", "lr_scale", "effective lr", "weight decay"}
_NAMES_SHOWN = 3
_LISTED = 10


def describe(obj, *, model=None) -> str:
    """Show the parameter groups of an optimizer, a list of groups or a TrainGraph, one row per group.

    Args:
        obj: a ``torch.optim.Optimizer``; a list of group dicts (from ``param_groups`` or hand-written,
            where a missing ``lr_scale`` counts as 1.0 and missing ``names`` are looked up in ``model``);
            or an object with ``optimizer`` (an optimizer or ``None``) and ``mode`` attributes, such as a
            ``TrainGraph``.
        model: the model the groups come from. Adds a section listing frozen parameters (and trainable
            ones in no group, and tensors that are not parameters of the model, if any). A
            DistributedDataParallel or torch.compile wrapper is looked through, as `param_groups` does.

    Returns:
        The table as a string: group, rule (index or ``default``), tensors, elements, lr, lr_scale,
        effective lr (lr x lr_scale), weight decay and the first names. ``-`` marks a hyperparameter the
        group does not set; when ``lr`` is not set, the effective lr reads ``<lr_scale> x lr``.

    Raises:
        TypeError: ``obj`` is none of the above, a group in the list is not a dict, or ``model`` is not an
            ``nn.Module``.

    Example:
        >>> from torch import nn
        >>> from dualmode import describe
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> print(describe([{"params": model[2].parameters(), "lr": 0.1},
        ...                 {"params": list(model[0].parameters()), "lr": 0.01, "lr_scale": 2.0}], model=model))
        group  rule  tensors  elements    lr  lr_scale  effective lr  weight decay  names
        0      -           ?         ?   0.1         1           0.1             -  ?
        1      -           2        40  0.01         2          0.02             -  0.weight, 0.bias
        2 tensors, 40 elements in 2 groups ('?': a one-shot iterator, not read; '-': not set in the group)
        frozen (requires_grad=False): none
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = None if model is None else bare_model(model)
    if isinstance(obj, torch.optim.Optimizer):
        return "\n".join(_optimizer_lines(obj, model))
    if isinstance(obj, (list, tuple)):
        return "\n".join(_group_lines(obj, model, hand_written=True))
    if hasattr(obj, "optimizer") and hasattr(obj, "mode"):
        if obj.optimizer is None:
            lines = ["no optimizer (evaluation graph)"] + _frozen_lines(model)
        else:
            lines = _optimizer_lines(obj.optimizer, model)
        return "\n".join([f"mode: {obj.mode}"] + lines)
    raise TypeError(f"describe takes an optimizer, a list of param groups or a TrainGraph, got {type(obj).__name__}")


def _optimizer_lines(optimizer, model):
    header = f"{type(optimizer).__name__} with {len(optimizer.param_groups)} param groups"
    return [header] + _group_lines(optimizer.param_groups, model, hand_written=False)


def _group_lines(groups, model, *, hand_written):
    first_name = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    rows, params_of = [], []
    for i, group in enumerate(groups):
        if not isinstance(group, Mapping):
            raise TypeError(f"group {i} is a {type(group).__name__}, not a dict")
        params_of.append(_params(group.get("params", [])))
        rows.append(_row(i, group, params_of[-1], first_name))
    known = [p for params in params_of if params is not None for p in params]
    unread = any(params is None for params in params_of)
    notes = ["'?': a one-shot iterator, not read"] if unread else []
    if hand_written and any("-" in (row[4], row[7]) for row in rows):
        notes.append("'-': not set in the group")
    lines = _table(rows)
    lines.append(f"{len(known)} tensors, {sum(p.numel() for p in known):,} elements in {len(groups)} groups"
                 + (f" ({'; '.join(notes)})" if notes else ""))
    if model is None:
        return lines
    lines += _frozen_lines(model)
    seen = {id(p) for p in known}
    orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if orphans and not unread:
        lines.append(f"trainable but in no group: {_first(orphans, _LISTED)}")
    foreign = [f"group {i}: tensor of shape {tuple(p.shape)}" for i, params in enumerate(params_of)
               for p in params or [] if id(p) not in first_name]
    if foreign:
        lines.append(f"not parameters of the model: {_first(foreign, _LISTED)}")
    return lines


def _row(i, group, params, first_name):
    """One table row; ``params`` is the group's tensors, or None when they cannot be read."""
    scale = _number(group.get("lr_scale", 1.0))
    lr = _number(group.get("lr"))
    effective = _fmt(lr * scale) if lr is not None and scale is not None else f"{_fmt(scale)} x lr"
    if params is None:
        tensors = elements = names = "?"
    else:
        given = group.get("names")
        if given is None or len(given) != len(params):
            given = [first_name.get(id(p), "?") for p in params]
        tensors, elements = str(len(params)), f"{sum(p.numel() for p in params):,}"
        names = _first(given, _NAMES_SHOWN) if given else "(empty)"
    return [str(i), str(group.get("rule", "-")), tensors, elements, _fmt(lr), _fmt(scale), effective,
            _fmt(_number(group.get("weight_decay"))), names]


def _frozen_lines(model):
    if model is None:
        return []
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    if not frozen:
        return ["frozen (requires_grad=False): none"]
    elements = sum(p.numel() for _, p in frozen)
    return [f"frozen (requires_grad=False): {len(frozen)} tensors, {elements:,} elements: "
            f"{_first([n for n, _ in frozen], _LISTED)}"]


def _table(rows):
    widths = [max(len(r[c]) for r in [_HEADERS, *rows]) for c in range(len(_HEADERS))]
    lines = []
    for row in [_HEADERS, *rows]:
        cells = [cell.rjust(w) if head in _RIGHT else cell.ljust(w) for head, cell, w in zip(_HEADERS, row, widths)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _params(params):
    """The group's tensors as a list, or None for a one-shot iterator that reading would use up."""
    if isinstance(params, torch.Tensor):
        return [params]
    if iter(params) is params:
        return None
    return list(params)


def _number(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _fmt(value):
    return "-" if value is None else f"{value:.6g}"


def _first(names, most):
    names = list(names)
    return ", ".join(names[:most]) + (f", ... (+{len(names) - most})" if len(names) > most else "")
