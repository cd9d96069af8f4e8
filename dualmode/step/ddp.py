"""DistributedDataParallel in a TrainGraph, the part both modes share: finding the DDP modules of a step,
`no_sync()` for the micro-batches of an accumulation window, and one finite-check answer for every rank.

Eager mode runs DDP itself: its backward averages the gradients over the ranks, so clipping and the optimizer
see reduced gradients. Graph mode (dualmode/graph/collectives.py) does the same reduction inside the graph.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def ddp_modules(modules: list[nn.Module]) -> list[DistributedDataParallel]:
    """The DistributedDataParallel modules among `modules` and their submodules, each once."""
    found = {}
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, DistributedDataParallel):
                found[id(sub)] = sub
    return list(found.values())


def process_group(ddps: list[DistributedDataParallel]):
    """The one process group of the step's DDP modules; ValueError when they use different ones."""
    groups = {id(d.process_group): d.process_group for d in ddps}
    if len(groups) != 1:
        raise ValueError(f"the step's {len(ddps)} DistributedDataParallel modules use {len(groups)} process "
                         "groups; a TrainGraph reduces over one: build them on the same group")
    return next(iter(groups.values()))


def no_sync(modules: list[nn.Module], accumulate: bool):
    """DDP's `no_sync()` on every DDP module for a micro-batch before the last of a window: one reduce per update."""
    stack = contextlib.ExitStack()
    if accumulate:
        for ddp in ddp_modules(modules):
            stack.enter_context(ddp.no_sync())
    return stack


def ranks_not_finite(finite: bool, modules: list[nn.Module]) -> list[int] | None:
    """The ranks whose value is not finite, the same list on every rank (one all-reduce); None without DDP.

    Under DDP every rank must skip the same update, or their parameters part ways.
    """
    ddps = ddp_modules(modules)
    if not ddps:
        return None
    group = process_group(ddps)
    device = next((p.device for p in ddps[0].parameters()), torch.device("cpu"))
    flags = torch.zeros(torch.distributed.get_world_size(group), device=device)
    flags[torch.distributed.get_rank(group)] = 0.0 if finite else 1.0
    torch.distributed.all_reduce(flags, group=group)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]
