"""How long graph mode's make_fx trace of one whole step takes, and the update's share of it.

MobileNetV2 (10 classes, 32x32 inputs, batch 64) in a TrainGraph in graph mode with the `eager` backend, so
nothing is compiled: the first call is trace + one step. Prints the trace's wall seconds and those spent in the
traced update (StepTracer._update). The machine is shared: repeat and compare runs taken side by side.

Run:  python benchmarks/trace_time.py [--optimizer sgd|adamw] [--runs 3]   (each run in a fresh process)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def one_run(optimizer: str) -> tuple[float, float]:
    import torch
    from torch import nn

    import dualmode as dm
    from dualmode.apps.models.mobilenet_v2 import mobilenet_v2
    from dualmode.graph import runner, trace

    seconds = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] = time.perf_counter() - start
        return wrapper

    runner.trace_step = timed("trace", trace.trace_step)
    trace.StepTracer._update = timed("update", trace.StepTracer._update)

    class Step(dm.TrainGraph):
        def __init__(self, model):
            options = {"backend": "eager", "mode": None, "dynamic": False, "options": None}
            super().__init__(mode="graph", config=dm.StepConfig(compile_options=options))
            self.model, self.loss_fn = model, nn.CrossEntropyLoss()
            params = model.parameters()
            self.add_optimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9) if optimizer == "sgd"
                               else torch.optim.AdamW(params, lr=1e-3))

        def build(self, x, y):
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            return loss

    torch.manual_seed(0)
    Step(mobilenet_v2(num_classes=10))(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    return seconds["trace"], seconds["update"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        trace_s, update_s = one_run(args.optimizer)
        print(f"trace {trace_s:.2f} s, update {update_s:.2f} s")
        return
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, __file__, "--one", "--optimizer", args.optimizer],
                             capture_output=True, text=True, timeout=600, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
