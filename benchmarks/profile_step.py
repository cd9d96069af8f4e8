"""Where the time of one graph-mode step goes, against eager mode: Python-side overhead vs compiled compute.

1. The parts of `GraphRunner.run` (dualmode/graph.py) timed one by one, over many calls: building the
   `StepCall` (which walks the modules for their tensors), its cache key (`key_parts`), fetching the input
   slots, the compiled function, and unflattening the outputs; then the whole `step(x, y)` call.
2. Inside the compiled function: cProfile of the graph-mode step, split into inductor's generated `call`
   (the kernels) and everything around it (dynamo's guards, AOTAutograd's runtime wrappers).
3. torch.profiler: the top operators by self CPU time in each mode.

Run:  python benchmarks/profile_step.py [--model mlp|mobilenet_v2] [--batch-size 64] [--calls 30]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from torch.utils._pytree import tree_unflatten

from dualmode.bench_machine import ForeignLoad, usable_cores
from dualmode.bench_variants import BenchSettings, VARIANTS, make_batch
from dualmode.inputs import StepCall


def median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run_parts(step, x, y, calls: int) -> dict[str, float]:
    """Median ms of each part of GraphRunner.run, done the way run() does it, and of the whole call."""
    runner = step._graph
    phase = step._phase()
    call = StepCall(step, phase, (x, y), {})
    key = tuple(call.key_parts().items())
    compiled = runner._cache[key]
    inputs = [call.fetch(slot, runner._scalars) for slot in compiled.slots]
    with torch.no_grad():
        outs = compiled.fn(*inputs)

    def compiled_fn():
        with torch.no_grad():
            compiled.fn(*inputs)

    return {
        "StepCall(...)": median_ms(lambda: StepCall(step, phase, (x, y), {}), calls),
        "key_parts() + cache lookup": median_ms(lambda: runner._cache.get(tuple(call.key_parts().items())), calls),
        "fetch slots": median_ms(lambda: [call.fetch(slot, runner._scalars) for slot in compiled.slots], calls),
        "compiled fn (guards + wrappers + kernels)": median_ms(compiled_fn, calls),
        "tree_unflatten": median_ms(lambda: tree_unflatten(list(outs) + compiled.out_consts, compiled.out_spec),
                                    calls),
        "whole step(x, y)": median_ms(lambda: step(x, y), calls),
        "slots": len(compiled.slots),
    }


def kernel_share(step, x, y, calls: int) -> tuple[float, float]:
    """(ms per call in inductor's generated `call`, ms per call in total) from cProfile of the step."""
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        step(x, y)
    profile.disable()
    stats = pstats.Stats(profile)
    total = stats.total_tt
    kernels = sum(v[3] for k, v in stats.stats.items()
                  if k[2] == "call" and ("torchinductor" in k[0] or "inductor" in k[0] and k[0].endswith(".py")
                                         and "/torch/" not in k[0]))
    return 1000 * kernels / calls, 1000 * total / calls


def top_ops(step, x, y, calls: int, rows: int) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step(x, y)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "mobilenet_v2"], default="mlp")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(usable_cores())
    settings = BenchSettings(model=args.model, batch_size=args.batch_size)
    x, y = make_batch(settings)
    steps = {mode: VARIANTS[mode].make(settings) for mode in ("eager", "graph")}
    for name, step in steps.items():
        start = time.perf_counter()
        step(x, y)
        print(f"{name}: first call {time.perf_counter() - start:.2f} s")
        for _ in range(3):
            step(x, y)
    load = ForeignLoad([])
    load.start()
    print(f"\n== {args.model}, batch {args.batch_size}, torch {torch.__version__}, {usable_cores()} threads ==")
    print(f"eager step: {median_ms(lambda: steps['eager'](x, y), args.calls):.2f} ms")
    print("graph step, the parts of GraphRunner.run (median ms per call):")
    for part, ms in run_parts(steps["graph"], x, y, args.calls).items():
        print(f"  {part:44s} {ms:9.3f}" if part != "slots" else f"  input slots: {ms}")
    inside, total = kernel_share(steps["graph"], x, y, args.calls)
    print(f"cProfile of the graph step: {total:.2f} ms per call (profiled), of which {inside:.2f} ms in inductor's "
          f"generated call() (the kernels), {total - inside:.2f} ms around it")
    print(f"foreign load during the measurements: {load.stop()}")
    for name, step in steps.items():
        print(f"\n-- torch.profiler, {name} mode, {args.calls} steps --")
        print(top_ops(step, x, y, args.calls, args.rows))


if __name__ == "__main__":
    main()
