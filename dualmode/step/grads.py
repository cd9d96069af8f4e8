"""Gradients as they were: eager mode undoes what a call that raised added to `p.grad`."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def restored_on_error(params: list[torch.Tensor]):
    """If the block raises, give each parameter back the gradient it had before the block (None stays None).

    Inside an accumulation window `p.grad` holds the micro-batches summed so far, and `loss.backward()` adds
    to it in place, so those gradients are copied first; outside a window they are None and nothing is copied.
    """
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    try:
        yield
    except BaseException:
        for p, grad in zip(params, saved):
            p.grad = grad
        raise


def every_param(optimizer: torch.optim.Optimizer | None, modules: list[tuple[str, torch.nn.Module]]) -> list:
    """Each parameter of the optimizer's groups and of the modules, once (a tied one is one tensor)."""
    groups = optimizer.param_groups if optimizer is not None else []
    params = [p for g in groups for p in g["params"]] + [p for _, m in modules for p in m.parameters()]
    return list({id(p): p for p in params}.values())
