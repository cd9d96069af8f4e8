"""Graph mode's two ways to update: the optimizer's own step() traced, or a built-in rule (dualmode/graph/updates.py).

For SGD (momentum 0.9) and Adam on the MLP and MobileNetV2 (for 32x32 inputs), each route runs in a fresh
process with a fresh inductor cache (a cold compile): the first call (trace + compile + one step, seconds), then
the median and fastest of the timed steps (ms). The load average before and after is recorded, since the
machine is shared: read the fastest step as the undisturbed cost.

Run:  python benchmarks/optim_routes.py [--models mlp mobilenet_v2] [--steps 15] [--json FILE]
      (one case: python benchmarks/optim_routes.py --one mlp adam own)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

OPTIMIZERS = ("sgd", "adam")
ROUTES = ("own", "rule")  # the optimizer's own step() traced; the built-in rule
BATCH = {"mlp": 64, "mobilenet_v2": 32}


def one(model_name: str, opt_name: str, route: str, steps: int) -> dict:
    import torch
    from capture_routes import (
        Step,  # graph mode, cross-entropy loss; this script's folder is on sys.path
    )

    import dualmode as dm
    from dualmode.apps import models
    from dualmode.graph import plans, updates

    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[opt_name]
    if route == "rule":
        plans.KEPT_RULES[cls] = {"sgd": updates.SGD, "adam": updates.ADAM}[opt_name]
    else:
        plans.KEPT_RULES.pop(cls, None)

    torch.manual_seed(0)
    model = getattr(models, model_name)()
    groups = dm.param_groups(model, [{"params": "*.bias", "lr_scale": 2.0}])
    if opt_name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(groups, lr=1e-3)
    step = Step(model, optimizer)
    batch = BATCH[model_name]
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    step(x, y)
    first_call = time.perf_counter() - start
    for _ in range(2):
        step(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(x, y)
        times.append((time.perf_counter() - start) * 1e3)
    assert step.compile_count == 1, step.explain()
    return {"model": model_name, "batch": batch, "optimizer": opt_name, "route": route,
            "update": step.explain().compiles[0].updates[0], "first_call_s": round(first_call, 2),
            "median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
            "load_before": load_before, "load_after": os.getloadavg()[0], "steps": steps,
            "torch": torch.__version__, "cores": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "mobilenet_v2"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "OPTIMIZER", "ROUTE"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.steps)))
        return
    rows = []
    for model in args.models:
        for opt in OPTIMIZERS:
            for route in ROUTES:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="optim_routes_"))
                command = [sys.executable, __file__, "--one", model, opt, route, "--steps", str(args.steps)]
                out = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=1800)
                if out.returncode != 0:
                    raise RuntimeError(out.stderr[-2000:])
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(_row(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"note": "cold inductor compile per row; shared 2-core machine, see load_before/after",
                       "rows": rows}, f, indent=1)


def _row(r: dict) -> str:
    return (f"| {r['model']} | {r['batch']} | {r['optimizer']} | {r['route']} | {r['first_call_s']} | "
            f"{r['median_ms']} | {r['min_ms']} | {r['load_before']:.1f} / {r['load_after']:.1f} |")


if __name__ == "__main__":
    main()
