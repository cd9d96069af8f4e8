"""What graph mode's watch on Python values (dualmode/graph/guards.py) costs per call.

    python benchmarks/guard_cost.py [--repeat 2000]

For tests/steps.py's TinyNet and for MobileNetV2 (dualmode.apps.models, batch 2, 32x32), one graph-mode call
compiles the step (aot_eager backend); then the two checks the runner makes before every call are timed:
`refusals.check_hooks` (tensor hooks on parameters, global module hooks) and `Guard.change()` (every attribute the
trace read, compared with the traced value). Prints the number of watched attributes, microseconds per call
(median of 7 rounds of --repeat calls), and the time of one whole graph-mode step for comparison. The machine
is shared: the figures move with its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the checkout: tests.steps

import dualmode as dm
from dualmode.apps.models import mobilenet_v2
from dualmode.graph import refusals
from tests.steps import FAST, Step, tiny_net


def _per_call_us(fn, repeat: int) -> float:
    rounds = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        rounds.append((time.perf_counter() - start) / repeat * 1e6)
    return statistics.median(rounds)


def measure(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeat: int) -> None:
    step = Step(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), mode="graph",
                config=dm.StepConfig(compile_options=dict(FAST)))
    step(x, y)  # compiles
    runner = step._graph
    (compiled,) = [c for variants in runner._cache.values() for c in variants]
    guard = compiled.guard
    from dualmode.graph.inputs import StepTensors

    tensors = StepTensors(step._modules_of_step())
    hooks_us = _per_call_us(lambda: refusals.check_hooks(tensors.names, tensors.tensors, tensors.is_param), repeat)
    guard_us = _per_call_us(guard.change, repeat)
    steps = 5
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    step_ms = (time.perf_counter() - start) / steps * 1e3
    print(f"| {name} | {len(guard.watches)} | {len(tensors.tensors)} | {guard_us:.1f} | {hooks_us:.1f} | "
          f"{step_ms:.2f} | {(guard_us + hooks_us) / (step_ms * 10):.3f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| step | watched attributes | parameters and buffers | Guard.change() us/call | check_hooks us/call "
          "| whole graph step ms (aot_eager) | guard share of the step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    g = torch.Generator().manual_seed(0)
    measure("TinyNet (tests/steps.py), batch 16", tiny_net(), torch.randn(16, 6, generator=g),
            torch.randint(0, 3, (16,), generator=g), args.repeat)
    torch.manual_seed(0)
    measure("MobileNetV2 (dualmode.apps.models), batch 2, 32x32", mobilenet_v2(),
            torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g), args.repeat // 10)


if __name__ == "__main__":
    main()
