"""One rank of the 2-process tests in test_two_ranks.py: `python tests/distributed/worker.py OUT_DIR`, with
MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE set as torchrun sets them. It saves its results, then rank 1
fails on purpose: both processes end with an error.

The parent test computes the single-process reference with the same functions (`net`, `train`), on the
whole global batch, in eager mode: torch.optim is the ground truth.
"""

from __future__ import annotations

import collections
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import dualmode as dm
from tests.steps import FAST

CALLS = 6  # 3 updates of 2 micro-batches each
GLOBAL_BATCH = 16


def net(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [("fc1", nn.Linear(6, 8)), ("act1", nn.Tanh()), ("fc2", nn.Linear(8, 8)), ("act2", nn.Tanh()),
              ("head", nn.Linear(8, 3))]
    if batch_norm:
        layers.insert(1, ("bn", nn.BatchNorm1d(8)))
    return nn.Sequential(collections.OrderedDict(layers))


class Step(dm.TrainGraph):
    def __init__(self, model, optimizer, scheduler, mode):
        config = dm.StepConfig(compile_options=dict(FAST), grad_accumulation_steps=2, clip_grad_max_norm=0.3,
                               check_finite=True)
        super().__init__(mode=mode, config=config)
        self.model = model
        self.add_optimizer(optimizer, lr_sch=scheduler)

    def build(self, x, y):
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        return loss


def make_step(model: nn.Module, mode: str) -> Step:
    """Per-group lr_scale (rules on the bare model's names, whether or not it is wrapped), a scheduler."""
    groups = dm.param_groups(model, [{"params": "fc1.*", "lr_scale": 0.5}, {"params": "head.*", "lr_scale": 2.0}],
                             default={})
    optimizer = torch.optim.SGD(groups, lr=0.2, momentum=0.9)
    return Step(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7), mode)


def global_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g))
            for _ in range(CALLS)]


def train(step: Step, rank: int = 0, world: int = 1) -> Step:
    """Each rank feeds its contiguous shard of every global batch."""
    shard = GLOBAL_BATCH // world
    for x, y in global_batches():
        step(x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard])
    return step


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in dm.bare_model(model).state_dict().items()}


def parity(rank: int, world: int) -> tuple[dict, dict[str, Step]]:
    """Both modes under DDP; and a BatchNorm model, graph mode against DDP's own eager run on this rank."""
    out, steps = {}, {}
    for mode in ("eager", "graph"):
        steps[mode] = train(make_step(nn.parallel.DistributedDataParallel(net()), mode), rank, world)
        out[mode] = state(steps[mode].model)
    out["explain"] = str(steps["graph"].explain())
    for mode in ("eager", "graph"):
        bn_step = train(make_step(nn.parallel.DistributedDataParallel(net(batch_norm=True)), mode), rank, world)
        out[f"bn_{mode}"] = state(bn_step.model)
    return out, steps


def not_finite_on_rank_1(rank: int, world: int, step: Step) -> dict:
    """An update whose loss is NaN on rank 1 only: what each rank raised, and whether it kept its parameters."""
    (x, y), shard = global_batches()[0], GLOBAL_BATCH // world
    x, y = x[rank * shard:(rank + 1) * shard].clone(), y[rank * shard:(rank + 1) * shard]
    step(x, y)  # the first micro-batch of a window; the NaN comes in the update call
    before = state(step.model)
    if rank == 1:
        x[0, 0] = float("nan")
    try:
        step(x, y)
        error = "no error"
    except FloatingPointError as e:
        error = str(e)
    after = state(step.model)
    return {"error": error, "kept": all(torch.equal(before[k], after[k]) for k in before), "steps": step.step_count}


def parameters_that_differ(rank: int, world: int) -> str:
    """The error of the first graph call when one rank changed a parameter after DDP's broadcast."""
    model = nn.parallel.DistributedDataParallel(net())
    if rank == 1:
        with torch.no_grad():
            dm.bare_model(model).fc2.bias.add_(1.0)
    try:
        train(make_step(model, "graph"), rank, world)
    except RuntimeError as error:
        return str(error)
    return "no error"


def a_rank_fails(rank: int, graph_step: Step) -> None:
    """Rank 1 fails in its training loop; rank 0 goes on into the compiled step's all-reduce."""
    for i, (x, y) in enumerate(global_batches()):
        if rank == 1 and i == 1:
            raise ValueError("rank 1 fails on purpose in its training loop")
        graph_step(x[:8], y[:8])


def main() -> None:
    """Save the results of parity, NaN on one rank and parameters that differ; then end with `a_rank_fails`."""
    out_dir = sys.argv[1]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    result, steps = parity(rank, world)
    for mode, step in steps.items():
        result[f"nan_{mode}"] = not_finite_on_rank_1(rank, world, step)
    result["differ"] = parameters_that_differ(rank, world)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    a_rank_fails(rank, steps["graph"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
