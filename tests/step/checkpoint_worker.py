"""A training run for the checkpoint tests, run as its own process: train, save, go on; or load and go on.

    python tests/step/checkpoint_worker.py save   CKPT OUT --accumulate K --save-at N --calls T
    python tests/step/checkpoint_worker.py resume CKPT OUT --accumulate K --calls T
    python tests/step/checkpoint_worker.py loop   CKPT            (saves over and over, for the SIGKILL test)
    python tests/step/checkpoint_worker.py rank   CKPT            (one rank of a 2-process gloo group: RANK, PORT)

`save` trains T calls without stopping and saves a checkpoint after call N on the way; `resume` starts from
other weights and other seeds, loads that checkpoint and makes the remaining calls. Both write the final
parameters, optimizer and scheduler state and the next draw of every random number generator to OUT.
"""

from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch
from torch import nn

import dualmode as dm  # noqa: E402
from tests.steps import batches  # noqa: E402  (the parent sets PYTHONPATH to the checkout)


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(self.drop(torch.tanh(self.fc1(x))))))


class DropoutStep(dm.TrainGraph):
    def __init__(self, model, optimizer, scheduler, config):
        super().__init__(mode="eager", config=config)
        self.model = model
        self.loss_fn = nn.CrossEntropyLoss()
        self.add_optimizer(optimizer, lr_sch=scheduler)

    def build(self, x, y):
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        return loss


def make_step(seed: int, accumulate: int, calls: int) -> DropoutStep:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = DropoutNet()
    groups = dm.param_groups(model, [{"params": "fc1.*", "lr_scale": 0.5},
                                     {"params": "head.*", "lr_scale": 3.0, "weight_decay": 0.0}])
    optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=calls // accumulate + 1)
    return DropoutStep(model, optimizer, scheduler, dm.StepConfig(grad_accumulation_steps=accumulate))


def final_state(step: DropoutStep) -> dict:
    return {"model": step.model.state_dict(), "optimizer": step.optimizer.state_dict(),
            "lr_scheduler": step.lr_scheduler.state_dict(), "step_count": step.step_count,
            "next_torch": torch.rand(4), "next_python": random.random(), "next_numpy": float(np.random.random())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=("save", "resume", "loop", "rank"))
    parser.add_argument("checkpoint")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--calls", type=int, default=8)
    args = parser.parse_args()
    data = batches(args.calls)
    if args.action == "loop":
        loop(args.checkpoint)
        return
    if args.action == "rank":
        rank(args.checkpoint)
        return
    if args.action == "save":
        step, start = make_step(0, args.accumulate, args.calls), 0
    else:
        step = make_step(123, args.accumulate, args.calls)  # other weights and seeds: all must come from the file
        start = dm.load_checkpoint(args.checkpoint, step)["calls"]
    for i in range(start, args.calls):
        step(*data[i])
        if args.action == "save" and i + 1 == args.save_at:
            dm.save_checkpoint(args.checkpoint, step, calls=i + 1, note="saved by the worker")
    torch.save(final_state(step), args.out)


def loop(path: str) -> None:
    """Save over and over, each time with every parameter equal to the save's number (about 8 MB a file)."""
    model = nn.Linear(1024, 1024)
    step = DropoutStep(model, torch.optim.SGD(model.parameters(), lr=0.1), None, dm.StepConfig())
    for i in range(1, 10_000):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(i)
        dm.save_checkpoint(path, step, number=i)
        print(i, flush=True)


def rank(path: str) -> None:
    """Rank 0 writes, the other rank must not, and both load the file right after save_checkpoint returns."""
    import datetime

    import torch.distributed as dist

    from dualmode.step import checkpoint

    me = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['PORT']}", rank=me, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        if me != 0:
            def refuse(*_):
                raise AssertionError("a rank other than 0 wrote the checkpoint")
            checkpoint.write_payload = refuse
        step = make_step(0, 1, 4)
        step(*batches(1)[0])
        dm.save_checkpoint(path, step, rank=me)
        other = make_step(5, 1, 4)
        extra = dm.load_checkpoint(path, other)  # the barrier: the file is complete on every rank
        assert extra == {"rank": 0}, extra
        assert all(torch.equal(a, b) for a, b in zip(step.model.parameters(), other.model.parameters()))
        print(f"rank {me} ok", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
