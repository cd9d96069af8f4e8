"""`config.check_finite`, written once for both modes: the loss and every gradient must be finite.

Eager mode checks real tensors before `optimizer.step()`; graph mode computes the same flags inside the traced
step (`finite_flags`), keeps every old value where they fail, and hands them back to be named here.
"""

from __future__ import annotations

import torch

from dualmode.step.outputs import loss_of


def loss_for_check(out, step_name: str) -> torch.Tensor:
    """The loss among build()'s outputs; ValueError saying what build() returned when there is none."""
    loss = loss_of(out)
    if loss is None:
        raise ValueError(
            f"config.check_finite needs the loss, but {step_name}.build() returned {_what(out)}: return a "
            "scalar tensor, a sequence starting with it, or a dict with a 'loss' entry (or set "
            "check_finite=False)")
    return loss


def _what(out) -> str:
    if out is None:
        return "None"
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)} (not one value)"
    if isinstance(out, dict):
        return f"a dict without a 'loss' entry (keys {sorted(map(str, out))})"
    if isinstance(out, (tuple, list)):
        kind = type(out).__name__
        return f"a {kind} whose first item is not a scalar tensor" if out else f"an empty {kind}"
    return f"a {type(out).__name__}"


ON_RANK = "the loss or a gradient on rank"  # under torch.distributed, one flag per rank follows the own ones


def on_rank(rank: int) -> str:
    return f"{ON_RANK} {rank}"


def finite_flags(loss: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """One bool per value, the loss first: is it finite everywhere. Traceable; eager mode uses it too."""
    return torch.stack([torch.isfinite(t.detach()).all() for t in [loss, *grads]])


def culprits(flags: torch.Tensor, loss: torch.Tensor | None, grad_names: list[str]) -> list[str]:
    """Name each value whose flag is False: 'the loss is nan', 'the gradient of model.fc1.weight'."""
    bad = [i for i, ok in enumerate(flags.tolist()) if not ok]
    named = []
    for i in bad:
        if i == 0:
            named.append(f"the loss is {loss.detach().float().sum().item()}" if loss is not None else "the loss")
        else:
            name = grad_names[i - 1]
            named.append(name if name.startswith(ON_RANK) else f"the gradient of {name}")
    return named


def refusal(step_name: str, step_count: int, named: list[str], what_happened: str) -> FloatingPointError:
    named = sorted(named, key=lambda n: not n.startswith(ON_RANK))  # the ranks first: DDP spreads a NaN to all
    shown = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
    return FloatingPointError(f"{step_name}: not finite at step {step_count}: {shown}; {what_happened}")
