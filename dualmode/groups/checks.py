"""Checks of the resolver's arguments and rules; each error names the rule or argument at fault."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

_RESERVED = {
    "names": "param_groups writes it",
    "rule": "param_groups writes it",
    "param_names": "it is torch's key; with it torch refuses a later plain add_param_group",
}


def check_rules(rules):
    """Return [(selector, hyperparameters, lr_scale)], or raise before anything is resolved."""
    if isinstance(rules, Mapping):
        raise TypeError("rules is a dict; pass a list of dicts, e.g. [{'params': 'fc2.*', 'lr_scale': 10.0}]")
    if isinstance(rules, (str, bytes, set, frozenset)) or not isinstance(rules, Iterable):
        raise TypeError(f"rules must be a list of dicts, got {type(rules).__name__}")
    checked = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, Mapping):
            raise TypeError(f"rule {i} is a {type(rule).__name__}, not a dict with a 'params' key")
        hyper, scale = check_hyper(rule, f"rule {i}", has_params=True)
        checked.append((rule["params"], hyper, scale))
    return checked


def check_hyper(hyper, where, *, has_params):
    """Split a rule (or ``default``) into its hyperparameters and its checked lr_scale."""
    if not isinstance(hyper, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(hyper).__name__}")
    if has_params and "params" not in hyper:
        raise ValueError(f"{where} has no 'params' key (the selector)")
    if not has_params and "params" in hyper:
        raise ValueError(f"{where} holds hyperparameters only; its parameters are those no rule selects")
    for key, why in _RESERVED.items():
        if key in hyper:
            raise ValueError(f"{where}: remove the key {key!r} ({why})")
    scale = hyper.get("lr_scale", 1.0)
    check_positive(scale, f"{where}: lr_scale")
    return {k: v for k, v in hyper.items() if k not in ("params", "lr_scale")}, float(scale)


def check_positive(value, what):
    if type(value) is float and 0 < value < math.inf:  # the usual case, without the numbers.Real ABC check
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite positive number, got {value!r}")


def check_no_weight_decay(no_weight_decay):
    if isinstance(no_weight_decay, bool):
        return []
    globs = [no_weight_decay] if isinstance(no_weight_decay, str) else no_weight_decay
    if not isinstance(globs, (list, tuple)) or not all(isinstance(g, str) for g in globs):
        raise TypeError(f"no_weight_decay must be True, False, a glob or a list of globs, got {no_weight_decay!r}")
    return list(globs)


def check_layer_args(layer_decay, layers):
    if layer_decay is not None:
        check_positive(layer_decay, "layer_decay")
    if layers is not None:
        if layer_decay is None:
            raise ValueError("layers= is used only by layer_decay; pass layer_decay too")
        if not isinstance(layers, (list, tuple)):
            raise TypeError(f"layers must be a list of selectors, got {type(layers).__name__}")
