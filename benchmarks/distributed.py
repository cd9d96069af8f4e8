"""Data-parallel throughput of one TrainGraph step under torchrun: global samples per second, in both modes.

Every rank trains the bench's mlp (3072-512-512-10) wrapped in DistributedDataParallel on its shard of a global
batch; the timed steps run between two barriers, so the figure is the slowest rank's. Rank 0 prints one line
per mode, the collectives of the compiled step (`explain()`), and the share of the cores that other processes
kept busy meanwhile (the machine may be shared).

Run:  torchrun --standalone --nproc_per_node N benchmarks/distributed.py [--batch-size 256] [--steps 30]
          [--backend inductor|aot_eager] [--threads T] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import dualmode as dm
from dualmode.apps.bench.machine import ForeignLoad
from dualmode.apps.models import mlp


class Step(dm.TrainGraph):
    def __init__(self, model, mode, backend):
        super().__init__(mode=mode, config=dm.StepConfig(compile_options={"backend": backend, "mode": None,
                                                                          "dynamic": False, "options": None}))
        self.model = model
        groups = dm.param_groups(model, [{"params": "3.*", "lr_scale": 10.0}, {"params": "*.bias", "lr_scale": 2.0}],
                                 default={})
        self.add_optimizer(torch.optim.SGD(groups, lr=0.01, momentum=0.9))

    def build(self, x, y):
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        return loss


def measure(mode: str, args, rank: int, world: int, pids: list[int]) -> dict:
    torch.manual_seed(0)
    step = Step(nn.parallel.DistributedDataParallel(mlp()), mode, args.backend)
    shard = args.batch_size // world
    g = torch.Generator().manual_seed(1 + rank)
    x, y = torch.randn(shard, 3, 32, 32, generator=g), torch.randint(0, 10, (shard,), generator=g)
    start = time.perf_counter()
    step(x, y)  # the first call compiles in graph mode
    first_s = time.perf_counter() - start
    for _ in range(args.warmup):
        step(x, y)
    load = ForeignLoad(pids)
    dist.barrier()
    load.start()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(x, y)
    dist.barrier()
    seconds = time.perf_counter() - start
    return {"mode": mode, "processes": world, "global_batch": shard * world,
            "threads_per_process": torch.get_num_threads(), "first_call_s": round(first_s, 2),
            "ms_per_step": round(1000 * seconds / args.steps, 2),
            "samples_per_s": round(args.steps * shard * world / seconds, 1), "foreign_load": load.stop(),
            "explain": str(step.explain()) if mode == "graph" else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256, help="the global batch (default: 256)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"])
    parser.add_argument("--json", metavar="FILE", help="rank 0 writes the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must divide evenly over {world} processes")
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    results = [measure(mode, args, rank, world, pids) for mode in args.modes]
    if rank == 0:
        for r in results:
            print(f"{r['mode']:>5}: {r['processes']} process(es) x {r['threads_per_process']} thread(s), global "
                  f"batch {r['global_batch']}: {r['samples_per_s']} samples/s, {r['ms_per_step']} ms/step, "
                  f"first call {r['first_call_s']} s, foreign load {r['foreign_load']}")
            if r["explain"]:
                print(r["explain"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"backend": args.backend, "torch": torch.__version__, "results": results}, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
