"""Gradient accumulation in graph mode: compiles, the first window (which compiles) and the fastest micro-steps.

MLP 3072-512-512-10, batch 64, SGD with momentum, inductor. Run it with an empty inductor cache for a cold
first window:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/accumulation.py [--k 4] [--static-batch]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

import dualmode as dm
from dualmode.apps.models import mlp


class Step(dm.TrainGraph):
    def __init__(self, model, optimizer, config):
        super().__init__(mode="graph", config=config)
        self.model = model
        self.add_optimizer(optimizer)

    def build(self, x, y):
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4, help="grad_accumulation_steps (default: 4)")
    parser.add_argument("--windows", type=int, default=10, help="timed windows after the first (default: 10)")
    parser.add_argument("--static-batch", action="store_true", help="config.dynamic_batch=False")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = mlp(hidden=512, num_classes=10)
    config = dm.StepConfig(grad_accumulation_steps=args.k, dynamic_batch=not args.static_batch)
    step = Step(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), config)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    start = time.perf_counter()
    for _ in range(args.k):
        step(x, y)
    first_window_s = time.perf_counter() - start
    micro, last = [], []
    for i in range(args.windows * args.k):
        start = time.perf_counter()
        step(x, y)
        (last if i % args.k == args.k - 1 else micro).append(1000 * (time.perf_counter() - start))
    print(f"compiles {step.compile_count}; first window (compile) {first_window_s:.1f} s; "
          f"fastest non-final micro-step {min(micro):.2f} ms, fastest k-th micro-step {min(last):.2f} ms")


if __name__ == "__main__":
    main()
