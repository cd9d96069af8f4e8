"""Data parallel in graph mode: the gradient all-reduce of DistributedDataParallel, inside the one traced step.

DDP's forward and its C++ reducer cannot be traced (pytorch#109774, #109697), and torch.compile's DDPOptimizer
splits a graph at bucket boundaries (pytorch#108966). So graph mode traces through each DDP module's inner
`.module` and reduces the gradients itself with `torch.distributed._functional_collectives`, which make_fx
records as `_c10d_functional` ops and inductor lowers:

- after backward (and after the micro-batches of an accumulation window are summed, so once per update), the
  gradients are flattened into buckets of at most DDP's `bucket_bytes_cap` (25 MiB by default), in reverse
  order as DDP does, each all-reduced with "sum" and scaled by 1/world size (gloo's AVG is recent); clipping,
  the finite check and the update then see the reduced gradients;
- with the finite check on, the "not finite" flag is summed over the ranks, so every rank skips the same update;
- with DDP's `broadcast_buffers` (the default), the buffers are broadcast from rank 0 before the forward, as
  DDP's forward does (see `sync_buffers` for accumulation windows).

Parameters start equal because DDP broadcasts them when it is built; each compile checks that with one small
all-reduce, and raises naming the first parameter that differs, rather than letting the ranks part ways.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.nn.parallel import DistributedDataParallel

from dualmode.step.ddp import ddp_modules, process_group

_OPS = ("all_reduce", "all_reduce_coalesced", "broadcast")


class GradientReducer:
    """What graph mode reduces for the DDP modules of one step: their parameters' gradients and buffers."""

    def __init__(self, call, ddps: list[DistributedDataParallel]):
        self.name, self.phase = call.step.name, call.phase
        self.group = process_group(ddps)
        self.world = dist.get_world_size(self.group)
        self.bucket_bytes = min(d.bucket_bytes_cap for d in ddps)
        index = call.tensors.index
        self.params = {index[id(p)] for d in ddps for p in d.parameters()}
        self.buffers = sorted({index[id(b)] for d in ddps if d.broadcast_buffers for b in d.buffers()})
        self.buckets = 0
        for d in ddps:
            if getattr(d, "_comm_hooks", None) or getattr(d, "mixed_precision", None) is not None:
                raise TypeError(f"{self.name}: graph mode reduces gradients itself and cannot run DDP's "
                                "communication hook or mixed precision; run the step with mode='eager'")

    @classmethod
    def for_call(cls, call) -> GradientReducer | None:
        """The reducer of a step with DDP modules; None without any (a single-process step)."""
        ddps = ddp_modules(call.tensors.modules)
        return cls(call, ddps) if ddps and call.optimizer is not None else None

    def check_same_parameters(self, call) -> None:
        """Raise unless every rank holds the same parameters (sum and sum of squares of each, one all-reduce)."""
        tis = sorted(self.params)
        sums = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
                            for t in (call.tensors.tensors[ti] for ti in tis)])
        low, high = sums.clone(), sums.clone()
        low.neg_()  # max of -x is -min: one all-reduce (MAX) gives both bounds
        both = torch.cat([high, low]).to(call.tensors.tensors[tis[0]].device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        high, low = both[: len(tis)].cpu(), -both[len(tis):].cpu()
        for ti, hi, lo in zip(tis, high, low):
            if not torch.equal(hi, lo):
                raise RuntimeError(
                    f"{self.name}: parameter {call.tensors.names[ti]!r} differs between the ranks at the first "
                    "graph-mode call (DDP broadcasts parameters only when it is built: change them on every rank "
                    "alike, or before wrapping the model)")

    def sync_buffers(self, stand_ins: list[torch.Tensor]) -> None:
        """Traced: every DDP buffer takes rank 0's value, as DDP's forward does with broadcast_buffers.

        DDP broadcasts in the forward that follows a reducing backward, so not in the last micro-batch of an
        accumulation window ("apply"); graph mode broadcasts in every earlier one (DDP: the first only).
        """
        if self.world == 1 or self.phase == "apply":
            return
        for bucket in _buckets([stand_ins[ti] for ti in self.buffers], self.bucket_bytes):
            flat = funcol.broadcast(_flat(bucket), 0, self.group)
            for t, new in zip(bucket, _unflat(flat, bucket)):
                t.copy_(new)

    def agree_finite(self, ok: torch.Tensor) -> torch.Tensor:
        """Traced: one flag per rank, the same on every rank: was everything finite there (one all-reduce)."""
        rank = dist.get_rank(self.group)
        bad = torch.zeros(self.world, dtype=torch.float32, device=ok.device)
        bad[rank] = (~ok).to(torch.float32)
        return funcol.all_reduce(bad, "sum", self.group) == 0

    def reduce(self, grads: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Traced: the DDP parameters' gradients averaged over the ranks, in buckets; the others as they are."""
        order = [ti for ti in reversed(list(grads)) if ti in self.params]  # the last layers' gradients first
        out = dict(grads)
        buckets = _buckets([grads[ti] for ti in order], self.bucket_bytes)
        position = 0
        for bucket in buckets:
            summed = funcol.all_reduce(_flat(bucket), "sum", self.group)
            mean = summed * (1.0 / self.world)
            out.update(zip(order[position:position + len(bucket)], _unflat(mean, bucket)))
            position += len(bucket)
        self.buckets = len(buckets)
        return out


def _buckets(tensors: list[torch.Tensor], cap_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype and device, each at most `cap_bytes` (or one tensor)."""
    buckets, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = buckets[-1] if buckets else None
        if last is None or (last[0].dtype, last[0].device) != (t.dtype, t.device) or size + nbytes > cap_bytes:
            buckets.append([t])
            size = nbytes
        else:
            last.append(t)
            size += nbytes
    return buckets


def _flat(bucket: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in bucket])


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in like]), like)]


@contextlib.contextmanager
def through_inner_module(modules: list[torch.nn.Module]):
    """While tracing, calling a DDP module calls its inner `.module` (with that module's own hooks).

    DDP's forward prepares its C++ reducer and broadcasts buffers: neither can be traced, and graph mode does
    both itself. The instance attribute shadows DDP's `forward` for the length of the trace only.
    """
    ddps = ddp_modules(modules)
    for d in ddps:
        d.forward = d.module.__call__  # a bound method: nn.Module keeps it as a plain instance attribute
    try:
        yield
    finally:
        for d in ddps:
            del d.forward


def summary(gm: torch.fx.GraphModule, reducer: GradientReducer | None) -> str:
    """The collectives in a traced step, by kind, and the gradient buckets; '' for none."""
    if reducer is None:
        return ""
    counts = {}
    for node in gm.graph.nodes:
        op = getattr(node.target, "_opname", None)
        if node.op == "call_function" and op in _OPS and "c10d_functional" in str(node.target):
            counts[op] = counts.get(op, 0) + 1
    ops = ", ".join(f"{n} {op}" for op, n in counts.items()) + f" over {reducer.world} ranks" if counts else "none"
    if reducer.phase == "accumulate":
        return f"{ops}; gradients summed here, reduced once at the update"
    return f"{ops}; gradients in {reducer.buckets} buckets of at most {reducer.bucket_bytes / 2**20:g} MiB"
