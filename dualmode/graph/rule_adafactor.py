"""Adafactor as a built-in rule: torch's Adafactor step reads Python numbers off tensors (`step.item()`, the
parameter's norm `.item()`), which a traced step cannot do, so graph mode follows its single-tensor loop here,
operation by operation, with those numbers kept as 0-d tensors. The parity tests hold it to torch.optim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dualmode.graph.updates import UpdateRule, step_tensor


class AdafactorSwitches(NamedTuple):
    weight_decay: bool  # weight_decay != 0
    maximize: bool
    eps1_from_dtype: bool  # eps=(None, ...): torch takes the machine epsilon of the parameter's dtype


def _flags(group: dict) -> AdafactorSwitches:
    return AdafactorSwitches(group["weight_decay"] != 0, bool(group["maximize"]), group["eps"][0] is None)


def _values(group: dict) -> dict:
    eps1, eps2 = group["eps"]
    return {"beta2_decay": float(group["beta2_decay"]), "eps1": 0.0 if eps1 is None else float(eps1),
            "eps2": float(eps2), "d": float(group["d"]), "weight_decay": float(group["weight_decay"])}


def _state(flags: tuple, p: torch.Tensor, group: dict) -> dict:
    state = {"step": step_tensor()}
    if p.dim() > 1:  # row and column factors of the second moment
        state["row_var"] = p.new_zeros(p.shape[:-1] + (1,))
        state["col_var"] = p.new_zeros(p.shape[:-2] + (1, p.shape[-1]))
    else:
        state["variance"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _rms(t: torch.Tensor) -> torch.Tensor:
    # torch takes `t.norm(2).item() / sqrt(numel)`: the norm in t's dtype, the rest in double
    return t.norm(2).to(torch.float64) / (t.numel() ** 0.5)


def _update(p, g, state, h, lr, flags):
    use_decay, maximize, eps1_from_dtype = flags
    if maximize:
        g = -g
    step = state["step"] + 1
    t = step.to(torch.float64)
    weight = (t ** h["beta2_decay"]).to(g.dtype)  # lerp_ takes a Python number, computed in the tensor's dtype
    rho = torch.minimum(lr, 1 / t.sqrt())
    alpha = torch.maximum(h["eps2"], _rms(p)) * rho
    if use_decay:
        p = p * (1 - lr * h["weight_decay"])
    eps1 = torch.finfo(p.dtype).eps if eps1_from_dtype else h["eps1"]
    new_state = {"step": step}
    if g.dim() > 1:
        row_var = state["row_var"].lerp(torch.norm(g, dim=-1, keepdim=True).square() / g.size(-1), weight)
        col_var = state["col_var"].lerp(torch.norm(g, dim=-2, keepdim=True).square() / g.size(-2), weight)
        new_state.update(row_var=row_var, col_var=col_var)
        var_estimate = (row_var @ col_var) / row_var.mean(dim=-2, keepdim=True).clamp(min=eps1)
    else:
        var_estimate = state["variance"].lerp(g * g, weight)
        new_state["variance"] = var_estimate
    update = var_estimate.clamp(min=eps1 * eps1).rsqrt() * g
    denom = torch.clamp(_rms(update) / h["d"], min=1.0)
    return p - (alpha / denom) * update, new_state


ADAFACTOR = UpdateRule(("beta2_decay", "eps1", "eps2", "d", "weight_decay"), _flags, _state, _update,
                       values=_values)
