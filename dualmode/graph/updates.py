"""How graph mode applies an optimizer's update, as traceable tensor code.

Graph mode traces an optimizer's own step() (optim_trace.py); these rules are the few it keeps because they
run measurably better than the traced torch step (plans.py says which and why). Each rule is written to follow
torch.optim's single-tensor loop operation by operation, and the tests hold it to `torch.optim` run in eager
mode: that is the ground truth.

A rule sees one parameter at a time, or (`foreach`) all parameters of one param group at once as lists, for a
shorter trace: one torch._foreach_* op for the whole group records one node where a loop records one per
parameter. It returns new tensors; the caller writes them back. Hyperparameters that
schedulers change (lr, momentum, betas, ...) arrive as 0-d tensors, so changing them never recompiles. Switches
that change the shape of the computation (nesterov, amsgrad, a zero momentum) are baked in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class UpdateRule:
    """The update of one optimizer class, in the form graph mode traces.

    Attributes:
        hyper: names of the numeric hyperparameters read from the group at every step (runtime inputs).
        flags: reads the switches baked into the compiled step from a param group.
        state: reads which state tensors one parameter needs, given the flags, with their initial values.
        update: `(param, grad, state, hyper, lr, flags) -> (new_param, new_state)`; with `foreach`, the same
            over lists: `(params, grads, states, hyper, lr, flags) -> (new_params, new_states)`.
        foreach: `update` takes the lists of one param group (torch._foreach_* ops), not one parameter.
        lazy: a state key that torch.optim creates from the first gradient rather than as zeros (SGD's
            momentum buffer); the rule then also gets `state["has_buffer"]`, a 0-d bool tensor.
        values: reads the `hyper` values from a group, where they are not plain group entries.
    """

    hyper: tuple[str, ...]
    flags: Callable[[dict], NamedTuple]
    state: Callable[[tuple, Tensor, dict], dict[str, Tensor]]
    update: Callable[..., tuple[Tensor, dict[str, Tensor]]]
    lazy: str | None = None
    values: Callable[[dict], dict[str, float]] | None = None
    foreach: bool = False


def step_tensor() -> Tensor:
    # torch.optim keeps "step" as a float32 CPU scalar when not capturable.
    return torch.tensor(0.0, dtype=torch.float32)


def _zeros(p: Tensor) -> Tensor:
    return torch.zeros_like(p, memory_format=torch.preserve_format)


# SGD --------------------------------------------------------------------------------------------------------

class SGDSwitches(NamedTuple):
    momentum: bool  # momentum != 0
    weight_decay: bool  # weight_decay != 0
    nesterov: bool
    maximize: bool


def _sgd_flags(group: dict) -> SGDSwitches:
    return SGDSwitches(group["momentum"] != 0, group["weight_decay"] != 0, bool(group["nesterov"]),
                       bool(group["maximize"]))


def _sgd_state(flags: tuple, p: Tensor, group: dict) -> dict[str, Tensor]:
    use_momentum = flags[0]
    return {"momentum_buffer": _zeros(p)} if use_momentum else {}


def _sgd_update(ps, gs, states, h, lr, flags):
    # torch.optim's single-tensor loop, each step over all parameters of the group at once
    use_momentum, use_decay, nesterov, maximize = flags
    if maximize:
        gs = torch._foreach_neg(gs)
    if use_decay:
        gs = torch._foreach_add(gs, torch._foreach_mul(ps, h["weight_decay"]))
    new_states = [{} for _ in ps]
    if use_momentum:
        bufs = [s["momentum_buffer"] for s in states]
        later = torch._foreach_add(torch._foreach_mul(bufs, h["momentum"]), torch._foreach_mul(gs, 1 - h["dampening"]))
        bufs = [torch.where(s["has_buffer"], b, g) for s, b, g in zip(states, later, gs)]  # torch's `buf is None`
        for new, buf in zip(new_states, bufs):
            new["momentum_buffer"] = buf
        gs = torch._foreach_add(gs, torch._foreach_mul(bufs, h["momentum"])) if nesterov else bufs
    return torch._foreach_sub(ps, torch._foreach_mul(gs, lr)), new_states


SGD = UpdateRule(("momentum", "dampening", "weight_decay"), _sgd_flags, _sgd_state, _sgd_update, "momentum_buffer",
                 foreach=True)


# Adam and AdamW (AdamW is Adam with decoupled_weight_decay=True in torch.optim) -------------------------------

class AdamSwitches(NamedTuple):
    weight_decay: bool  # weight_decay != 0
    decoupled_weight_decay: bool
    amsgrad: bool
    maximize: bool


def _adam_flags(group: dict) -> AdamSwitches:
    decoupled = bool(group.get("decoupled_weight_decay", False))
    return AdamSwitches(group["weight_decay"] != 0, decoupled, bool(group["amsgrad"]), bool(group["maximize"]))


def _adam_state(flags: tuple, p: Tensor, group: dict) -> dict[str, Tensor]:
    state = {"step": step_tensor(), "exp_avg": _zeros(p), "exp_avg_sq": _zeros(p)}
    if flags[2]:
        state["max_exp_avg_sq"] = _zeros(p)
    return state


def _adam_update(ps, gs, states, h, lr, flags):
    # torch.optim's single-tensor loop, each step over all parameters of the group at once
    use_decay, decoupled, amsgrad, maximize = flags
    beta1, beta2 = h["beta1"], h["beta2"]
    if maximize:
        gs = torch._foreach_neg(gs)
    # The step counts as one vector: their arithmetic traced once per group, not once per parameter
    steps = torch.stack([s["step"] for s in states]) + 1
    if use_decay:
        if decoupled:
            ps = torch._foreach_mul(ps, 1 - lr * h["weight_decay"])
        else:
            gs = torch._foreach_add(gs, torch._foreach_mul(ps, h["weight_decay"]))
    avgs = [s["exp_avg"] for s in states]
    exp_avgs = torch._foreach_add(avgs, torch._foreach_mul(torch._foreach_sub(gs, avgs), 1 - beta1))
    squares = torch._foreach_mul(torch._foreach_mul(gs, 1 - beta2), gs)
    exp_avg_sqs = torch._foreach_add(torch._foreach_mul([s["exp_avg_sq"] for s in states], beta2), squares)
    new_states = [{"step": t, "exp_avg": a, "exp_avg_sq": q}
                  for t, a, q in zip(steps.unbind(), exp_avgs, exp_avg_sqs)]
    # torch raises beta to the step as a Python number, in beta's dtype: float64 for a float, a tensor's own dtype
    # (float32 betas of a float64 model: float32 bias corrections, as torch computes them)
    step_sizes = (lr / (1 - beta1 ** steps.to(beta1.dtype))).unbind()
    bias_corrections2_sqrt = (1 - beta2 ** steps.to(beta2.dtype)).sqrt().unbind()
    second = exp_avg_sqs
    if amsgrad:
        second = torch._foreach_maximum([s["max_exp_avg_sq"] for s in states], exp_avg_sqs)
        for new, m in zip(new_states, second):
            new["max_exp_avg_sq"] = m
    denoms = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(second), bias_corrections2_sqrt), h["eps"])
    return torch._foreach_sub(ps, torch._foreach_mul(torch._foreach_div(exp_avgs, denoms), step_sizes)), new_states


ADAM = UpdateRule(("beta1", "beta2", "eps", "weight_decay"), _adam_flags, _adam_state, _adam_update, foreach=True)


# RMSprop ----------------------------------------------------------------------------------------------------

class RMSpropSwitches(NamedTuple):
    momentum: bool  # momentum > 0
    weight_decay: bool  # weight_decay != 0
    centered: bool
    maximize: bool


def _rmsprop_flags(group: dict) -> RMSpropSwitches:
    return RMSpropSwitches(group["momentum"] > 0, group["weight_decay"] != 0, bool(group["centered"]),
                           bool(group["maximize"]))


def _rmsprop_state(flags: tuple, p: Tensor, group: dict) -> dict[str, Tensor]:
    state = {"step": step_tensor(), "square_avg": _zeros(p)}
    if flags[0]:
        state["momentum_buffer"] = _zeros(p)
    if flags[2]:
        state["grad_avg"] = _zeros(p)
    return state


def _rmsprop_update(p, g, state, h, lr, flags):
    use_momentum, use_decay, centered, maximize = flags
    alpha = h["alpha"]
    if maximize:
        g = -g
    new_state = {"step": state["step"] + 1}
    if use_decay:
        g = g + h["weight_decay"] * p
    square_avg = state["square_avg"] * alpha + (1 - alpha) * g * g
    new_state["square_avg"] = square_avg
    if centered:
        grad_avg = state["grad_avg"] + (g - state["grad_avg"]) * (1 - alpha)
        new_state["grad_avg"] = grad_avg
        avg = (square_avg - grad_avg * grad_avg).sqrt()
    else:
        avg = square_avg.sqrt()
    avg = avg + h["eps"]
    if use_momentum:
        buf = state["momentum_buffer"] * h["momentum"] + g / avg
        new_state["momentum_buffer"] = buf
        return p - lr * buf, new_state
    return p - lr * (g / avg), new_state


RMSPROP = UpdateRule(("alpha", "eps", "momentum", "weight_decay"), _rmsprop_flags, _rmsprop_state, _rmsprop_update)


# Adagrad ----------------------------------------------------------------------------------------------------

class AdagradSwitches(NamedTuple):
    weight_decay: bool  # weight_decay != 0
    maximize: bool


def _adagrad_flags(group: dict) -> AdagradSwitches:
    return AdagradSwitches(group["weight_decay"] != 0, bool(group["maximize"]))


def _adagrad_state(flags: tuple, p: Tensor, group: dict) -> dict[str, Tensor]:
    init = group["initial_accumulator_value"]
    return {"step": step_tensor(), "sum": torch.full_like(p, init, memory_format=torch.preserve_format)}


def _adagrad_update(p, g, state, h, lr, flags):
    use_decay, maximize = flags
    if maximize:
        g = -g
    step = state["step"] + 1
    if use_decay:
        g = g + h["weight_decay"] * p
    clr = lr / (1 + (step.to(torch.float64) - 1) * h["lr_decay"])
    total = state["sum"] + g * g
    std = total.sqrt() + h["eps"]
    return p - clr * (g / std), {"step": step, "sum": total}


ADAGRAD = UpdateRule(("lr_decay", "eps", "weight_decay"), _adagrad_flags, _adagrad_state, _adagrad_update)


def hyper_values(rule: UpdateRule, group: dict) -> dict:
    """The group's current numeric hyperparameters, as the rule names them (betas are split in two).

    A tensor stays a tensor: torch.optim computes with it in its own dtype (a float32 lr in a float64 model).
    """
    if rule.values is not None:
        return rule.values(group)
    values = {}
    for name in rule.hyper:
        value = group["betas"][0 if name == "beta1" else 1] if name in ("beta1", "beta2") else group[name]
        values[name] = value if isinstance(value, Tensor) else float(value)
    return values


def total_grad_norm(grads: list[Tensor], norm_type: float) -> Tensor:
    """The norm of all gradients viewed as one vector, as torch.nn.utils.clip_grad_norm_ computes it."""
    norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def clip_grads(grads: list[Tensor], max_norm: float, norm_type: float) -> list[Tensor]:
    """Scale gradients so that their total norm is at most `max_norm` (torch's formula, 1e-6 included)."""
    if not grads:
        return grads
    total = total_grad_norm(grads, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g * coef.to(g.dtype) for g in grads]
