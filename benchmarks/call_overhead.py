"""The fixed cost of a graph-mode call outside the compiled function, in microseconds per call.

For a Linear(8, 8) and a 4-block MLP (Linear(32, 32) + ReLU, four times, then Linear(32, 10)) at batch 8, SGD
with momentum over two param groups: each timed call of `step(x, y)` is split into the time inside the compiled
function (torch.compile's callable: dynamo's guards, AOTAutograd's wrappers, the kernels) and everything else
(finding the compiled variant, fetching its inputs, the step's own bookkeeping). Medians over --calls calls of
the thread's CPU time (`time.thread_time`), which a shared machine disturbs less than the wall clock (one torch
thread, so the compiled function's CPU time is this thread's), and the wall-clock medians for comparison.

Run:  python benchmarks/call_overhead.py [--calls 2000] [--backend aot_eager]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import dualmode as dm
from dualmode.apps.bench.machine import ForeignLoad


class Step(dm.TrainGraph):
    def __init__(self, model, optimizer, config):
        super().__init__(mode="graph", config=config)
        self.model = model
        self.add_optimizer(optimizer)

    def build(self, x, y):
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        return loss


def models() -> dict[str, tuple[nn.Module, int]]:
    torch.manual_seed(0)
    blocks = [m for _ in range(4) for m in (nn.Linear(32, 32), nn.ReLU())]
    return {"Linear(8, 8)": (nn.Linear(8, 8), 8), "4-block MLP": (nn.Sequential(*blocks, nn.Linear(32, 10)), 32)}


def measure(model: nn.Module, features: int, calls: int, backend: str) -> dict[str, float]:
    groups = dm.param_groups(model, [{"params": "*bias", "lr_scale": 2.0}], default={"lr_scale": 1.0})
    config = dm.StepConfig(compile_options={"backend": backend, "mode": None, "dynamic": False, "options": None})
    step = Step(model, torch.optim.SGD(groups, lr=0.01, momentum=0.9), config)
    x, y = torch.randn(8, features), torch.randint(0, min(features, 10), (8,))
    step(x, y)
    ((compiled,),) = step._graph._cache.values()  # one key, one variant
    inside = []
    fn = compiled.fn

    def timed(*inputs):
        start, cpu = time.perf_counter(), time.thread_time()
        out = fn(*inputs)
        inside.append((time.perf_counter() - start, time.thread_time() - cpu))
        return out

    compiled.fn = timed
    for _ in range(50):
        step(x, y)
    inside.clear()
    totals = []
    for _ in range(calls):
        start, cpu = time.perf_counter(), time.thread_time()
        step(x, y)
        totals.append((time.perf_counter() - start, time.thread_time() - cpu))
    r = {"slots": len(compiled.slots)}
    for clock, k in (("cpu", 1), ("wall", 0)):
        r[f"outside_{clock}_us"] = 1e6 * statistics.median(t[k] - i[k] for t, i in zip(totals, inside))
        r[f"inside_{clock}_us"] = 1e6 * statistics.median(i[k] for i in inside)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--backend", default="aot_eager")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = ForeignLoad([])
    load.start()
    for name, (model, features) in models().items():
        r = measure(model, features, args.calls, args.backend)
        print(f"{name:14s} {r['slots']:3d} inputs: outside the compiled fn {r['outside_cpu_us']:6.1f} us CPU "
              f"({r['outside_wall_us']:6.1f} us wall), inside {r['inside_cpu_us']:6.1f} us CPU "
              f"({r['inside_wall_us']:6.1f} us wall)")
    print(f"foreign load {load.stop()} (share of the cores other processes kept busy)")


if __name__ == "__main__":
    main()
