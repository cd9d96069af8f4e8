"""Does graph mode need dynamo? Compile the step's traced GraphModule two ways and compare.

Graph mode (dualmode/graph.py) hands the GraphModule that make_fx traced to `torch.compile(gm, fullgraph=True)`:
dynamo traces it again (bytecode), guards every input at each call, and passes it on to AOTAutograd and
inductor. dualmode already guards the step itself (its cache key), so the alternative is to call the backend
on the traced graph directly: `torch._inductor.compile_fx.compile_fx(gm, example_inputs)`. This script
measures, on the same traced step, for both routes: the compile time (the first call) and the time per call.

Run:  python benchmarks/direct_backend.py [--model mlp|mobilenet_v2] [--batch-size 64] [--calls 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch._inductor.compile_fx import compile_fx

from dualmode.bench_machine import ForeignLoad, usable_cores
from dualmode.bench_variants import BenchSettings, VARIANTS, make_batch
from dualmode.inputs import StepCall


def per_call_ms(fn, inputs: list, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        with torch.no_grad():
            fn(*inputs)
        times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "mobilenet_v2"], default="mlp")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(usable_cores())
    settings = BenchSettings(model=args.model, batch_size=args.batch_size)
    x, y = make_batch(settings)
    step = VARIANTS["graph"].make(settings)
    start = time.perf_counter()
    step(x, y)  # traces and compiles with torch.compile, as graph mode does
    print(f"graph mode's first call (trace + torch.compile + one step): {time.perf_counter() - start:.2f} s")
    runner = step._graph
    call = StepCall(step, step._phase(), (x, y), {})
    compiled = runner._cache[tuple(call.key_parts().items())]
    inputs = [call.fetch(slot, runner._scalars) for slot in compiled.slots]
    gm = step.graph_module

    routes = {}
    start = time.perf_counter()
    via_dynamo = torch.compile(gm, fullgraph=True, dynamic=False)
    per_call_ms(via_dynamo, inputs, 1)
    routes["torch.compile(gm)"] = time.perf_counter() - start
    start = time.perf_counter()
    direct = compile_fx(gm, inputs)
    per_call_ms(direct, inputs, 1)
    routes["compile_fx(gm, inputs)"] = time.perf_counter() - start
    fns = {"torch.compile(gm)": via_dynamo, "compile_fx(gm, inputs)": direct}

    load = ForeignLoad([])
    load.start()
    times = {name: [] for name in fns}
    for _ in range(args.calls):  # interleaved, so that drift hits both alike
        for name, fn in fns.items():
            times[name] += per_call_ms(fn, inputs, 1)
    print(f"{args.model}, batch {args.batch_size}, {len(inputs)} inputs, torch {torch.__version__}; "
          f"foreign load {load.stop()}")
    for name in fns:
        t = sorted(times[name])
        print(f"  {name:24s} compile + first call {routes[name]:7.2f} s (this process's caches are warm), "
              f"per call median {statistics.median(t):8.3f} ms, min {t[0]:8.3f} ms")


if __name__ == "__main__":
    main()
