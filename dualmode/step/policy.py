"""The rules both modes follow, written once: effective lr, which gradients are clipped together, the checks
of group settings, and the errors both modes raise alike.

Eager mode applies them to real tensors, graph mode while tracing; the arithmetic works on floats and tensors.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from dataclasses import dataclass

import torch

from dualmode.groups.checks import check_positive


def lr_scale(group: dict, index: int) -> float:
    """The group's lr_scale (1.0 if absent); ValueError naming the group unless it is a finite positive number."""
    scale = group.get("lr_scale", 1.0)
    if type(scale) is float and 0 < scale < math.inf:  # the usual case, checked at every call
        return scale
    check_positive(scale, f"param group {index}: lr_scale")
    return float(scale)


def base_lr(group: dict, index: int) -> float:
    """The group's lr as a float; ValueError naming the group unless it is a finite number >= 0."""
    lr = group["lr"]
    if type(lr) is float and 0 <= lr < math.inf:  # the usual case, checked at every call
        return lr
    value = float(lr) if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"param group {index}: lr must be a finite number >= 0, got {lr!r}")
    return float(value)


def scaled_lr(lr, group: dict, index: int):
    """lr x the group's lr_scale: the effective lr, for a float, a tensor lr or a traced one."""
    return lr * lr_scale(group, index)


def effective_lr(group: dict, index: int) -> float:
    """The lr a group is updated with at the next step: group["lr"] x group["lr_scale"]."""
    return scaled_lr(base_lr(group, index), group, index)


def check_groups(groups: list[dict]) -> None:
    """Check every group's lr, lr_scale and clip settings before a step touches anything."""
    for i, group in enumerate(groups):
        base_lr(group, i)
        lr_scale(group, i)
        if group.get("clip_grad_max_norm") is not None:
            check_clip_settings(group["clip_grad_max_norm"], group.get("clip_grad_norm_type", 2.0), f"param group {i}")


def check_clip_settings(max_norm, norm_type, where: str) -> None:
    """ValueError naming `where` unless max_norm (None: no clipping) is a finite positive number and norm_type a
    positive norm or inf; the one check of the config's and the groups' clip settings."""
    if max_norm is not None and not (isinstance(max_norm, numbers.Real) and not isinstance(max_norm, bool)
                                     and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"{where}: clip_grad_max_norm must be a finite positive number or None, got {max_norm!r}")
    if not (isinstance(norm_type, numbers.Real) and not isinstance(norm_type, bool)
            and (norm_type > 0 or math.isinf(norm_type))):
        raise ValueError(f"{where}: clip_grad_norm_type must be a positive number or inf, got {norm_type!r}")


@dataclass(frozen=True)
class ClipSet:
    """Groups whose gradients are clipped together to one total norm."""

    groups: tuple[int, ...]
    max_norm: float
    norm_type: float


def clip_sets(groups: list[dict], config) -> list[ClipSet]:
    """Each group with its own `clip_grad_max_norm` is clipped alone; all others together by the config."""
    sets, rest = [], []
    for i, group in enumerate(groups):
        if group.get("clip_grad_max_norm") is not None:
            sets.append(ClipSet((i,), float(group["clip_grad_max_norm"]), float(group.get("clip_grad_norm_type", 2.0))))
        else:
            rest.append(i)
    if config.clip_grad_max_norm is not None and rest:
        sets.append(ClipSet(tuple(rest), float(config.clip_grad_max_norm), float(config.clip_grad_norm_type)))
    return sets


class BuildError(RuntimeError):
    """build() did what a step must not do (no backward, its own optimizer.step()); both modes raise it alike."""


def check_steppable(optimizer: torch.optim.Optimizer) -> None:
    """TypeError naming the optimizer when its step() needs a closure (LBFGS), in both modes alike."""
    params = list(inspect.signature(type(optimizer).step).parameters.values())[1:]
    if any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
        name = type(optimizer).__name__
        raise TypeError(f"a TrainGraph cannot step {name}, in either mode: {name}.step() needs a closure that "
                        "re-evaluates the loss several times per step, and a TrainGraph step runs build() once. "
                        f"Use an optimizer that steps without a closure, or call {name}.step(closure) in a loop of "
                        "your own.")


def no_gradient_error(step_name: str) -> BuildError:
    return BuildError(f"{step_name}.build() left no gradient on any parameter of the optimizer: call "
                        "loss.backward() inside build()")


def mark_stepped(optimizer: torch.optim.Optimizer) -> None:
    """Record that the optimizer stepped, as torch.optim's step wrapper does, for a graph-mode update.

    Schedulers read this flag to warn about `lr_scheduler.step()` before `optimizer.step()`; graph mode updates
    without calling `optimizer.step()`, so it sets the flag itself. Private to torch: set only where torch has it.
    """
    held = vars(optimizer)  # a scheduler's wrapper of step() is an instance attribute: no bound method made
    if "_opt_called" in held or hasattr(held.get("step"), "_wrapped_by_lr_sched"):
        optimizer._opt_called = True


@contextlib.contextmanager
def optimizer_calls_refused(optimizer: torch.optim.Optimizer | None, step_name: str):
    """For the length of build(): `optimizer.step()` and `zero_grad()` raise BuildError instead of running.

    The step itself updates and zeroes after build(); a build() that did either would update twice (eager
    mode) or trace torch.optim's internals (graph mode). The methods are shadowed by instance attributes and the
    optimizer's own attributes (an lr scheduler's wrapper of `step`) are put back exactly as they were.
    """
    if optimizer is None:
        yield
        return
    own = vars(optimizer)
    saved = {name: own[name] for name in ("step", "zero_grad") if name in own}

    def refuse(name):
        def refused(*args, **kwargs):
            raise BuildError(f"{step_name}.build() called optimizer.{name}(): the step calls it itself after "
                             f"build() returns (and zero_grad after the update); remove the call from build()")
        return refused

    own["step"], own["zero_grad"] = refuse("step"), refuse("zero_grad")
    try:
        yield
    finally:
        for name in ("step", "zero_grad"):
            if name in saved:
                own[name] = saved[name]
            else:
                del own[name]
