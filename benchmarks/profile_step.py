"""Where the time of one graph-mode step goes, against eager mode: Python-side overhead vs compiled compute.

1. The parts of `GraphRunner.run` (dualmode/graph/runner.py) timed one by one, over many calls: building the
   `StepCall` (which walks the modules for their tensors), its cache key (`key_parts`), fetching the input
   slots, the compiled function, and unflattening the outputs; then the whole `step(x, y)` call.
2. Inside the compiled function (torch.profiler): the time in inductor's compiled graph (the kernels), in
   the whole compiled region (with AOTAutograd's runtime wrappers), and in dynamo's guards.
3. Minor page faults per step in each mode: memory that glibc's allocator gave back to the OS after one step
   and that the next step touches again.
4. torch.profiler: self CPU ms per step by kind (convolution forward, convolution backward, inductor's kernels,
   the rest), and the top operators, in each mode. Inductor's kernels are named in the profile
   (`cpp.enable_kernel_profile`), so graph mode's compiled graph is split into them.

Run:  python benchmarks/profile_step.py [--model mlp|mobilenet_v2] [--batch-size 64] [--calls 30]
          [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from torch.utils._pytree import tree_unflatten

import dualmode as dm
from dualmode.apps.bench.machine import ForeignLoad, usable_cores
from dualmode.apps.bench.variants import VARIANTS, BenchSettings, make_batch
from dualmode.graph.batch import BatchDims
from dualmode.graph.inputs import StepCall


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
    view = step._view(step._modules_of_step())
    call = StepCall(view, phase, (x, y), {})

    def lookup():
        return runner._lookup(call.key_parts(), BatchDims(call.leaves, step.config.dynamic_batch))

    compiled = lookup()[2][0]  # the variants of the key: the one compiled
    inputs = compiled.fetch.inputs(call, runner._scalars)
    with torch.no_grad():
        outs = compiled.fn(*inputs)

    def compiled_fn():
        with torch.no_grad():
            compiled.fn(*inputs)

    return {
        "StepCall(...)": median_ms(lambda: StepCall(view, phase, (x, y), {}), calls),
        "key_parts() + cache lookup": median_ms(lookup, calls),
        "fetch slots": median_ms(lambda: compiled.fetch.inputs(call, runner._scalars), calls),
        "compiled fn (guards + wrappers + kernels)": median_ms(compiled_fn, calls),
        "tree_unflatten": median_ms(lambda: tree_unflatten(list(outs) + compiled.tracer.out_consts,
                                                                   compiled.tracer.out_spec),
                                    calls),
        "whole step(x, y)": median_ms(lambda: step(x, y), calls),
        "slots": len(compiled.slots),
    }


def compiled_split(prof, calls: int) -> dict[str, float]:
    """ms per call in the compiled region, in inductor's compiled graph, and in dynamo's guards (cache lookup)."""
    totals = {"compiled region (dynamo + AOTAutograd wrappers + graph)": "Torch-Compiled Region",
              "inductor's compiled graph (kernels)": "## Call CompiledFxGraph",
              "dynamo cache lookup (guards)": "TorchDynamo Cache Lookup"}
    events = prof.key_averages()
    return {what: sum(e.cpu_time_total for e in events if e.key.startswith(prefix)) / 1000 / calls
            for what, prefix in totals.items()}


def page_faults_per_call(step, x, y, calls: int) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        step(x, y)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def kind(op: str) -> str:
    """Which part of a step a profiled operator is (graph mode's convolutions run through the C++ wrapper's
    `aoti_torch_cpu_convolution_backward` or ATen's `mkldnn_convolution`)."""
    if "convolution_backward" in op:
        return "convolution backward"
    if "convolution" in op:
        return "convolution forward"
    if "cpp_fused" in op:
        return "inductor's kernels"
    return "the rest"


def by_kind(prof, calls: int) -> dict[str, float]:
    """Self CPU ms per step of each kind of operator."""
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        part = kind(event.key)
        totals[part] = totals.get(part, 0.0) + event.self_cpu_time_total / 1000 / calls
    return totals


def profile(step, x, y, calls: int):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step(x, y)
    return prof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "mobilenet_v2"], default="mlp")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call dm.keep_freed_memory() first (fails where it cannot be applied)")
    args = parser.parse_args()
    if args.keep_freed_memory and not dm.keep_freed_memory():
        raise SystemExit("dm.keep_freed_memory() could not be applied (its warning says why)")
    torch._inductor.config.cpp.enable_kernel_profile = True
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
    profiles = {name: profile(step, x, y, args.calls) for name, step in steps.items()}
    print("graph step under torch.profiler (ms per call):")
    for what, ms in compiled_split(profiles["graph"], args.calls).items():
        print(f"  {what:56s} {ms:9.3f}")
    for name, step in steps.items():
        print(f"{name}: {page_faults_per_call(step, x, y, args.calls):.0f} minor page faults per step")
    print(f"foreign load during the measurements: {load.stop()}")
    for name, prof in profiles.items():
        parts = ", ".join(f"{part} {ms:.1f}" for part, ms in sorted(by_kind(prof, args.calls).items()))
        print(f"{name}: self CPU ms per step by kind: {parts}")
    for name, prof in profiles.items():
        print(f"\n-- torch.profiler, {name} mode, {args.calls} steps --")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
