"""Record `dualmode bench` for mlp and mobilenet_v2 at batch 32 and 64 into benchmarks/results/, then its README.

Each run is written as <hardware>_<torch>_<compile mode>_<model>_b<batch>.json (and .png), e.g.
cpu-2core_torch2.13.0_inductor_mobilenet_v2_b64.json. The runs use the shared inductor cache, so their first
calls are cold only when the cache is (each file says, per variant); `--cold` first adds two MobileNetV2 batch-64
runs of the compiled variants with an empty cache each, in opposite orders (file names ending in _cold and
_cold_reversed), for the cold first-call figures. `--keep-freed-memory` records the timed runs again with every
variant's process keeping freed memory (`dm.keep_freed_memory()`), into files ending in _keep_freed_memory.
Before each run, the script waits (up to --max-wait seconds) for the machine to be quiet, as it may be shared.

Run:  python benchmarks/run_all.py [--cold] [--keep-freed-memory] [--only mlp_b64 ...] [--readme-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from dualmode.apps.bench import command as bench
from dualmode.apps.bench.machine import ForeignLoad
from dualmode.apps.bench.variants import DEFAULT_VARIANTS

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)

from results_readme import write_readme  # noqa: E402

BACKEND = "inductor"
STEPS = {"mlp": ("--steps", "100", "--warmup", "2", "--burst", "10"),
         # graph-no-recompute: graph mode without remat.py's pass; graph-malloc: without step_buffers.py's pool;
         # graph-saved-trace: with config.trace_cache (the b32 run saves the trace, the b64 run loads it: the batch
         # dimension is a symbol); in the same interleaved run.
         "mobilenet_v2": ("--steps", "12", "--warmup", "2", "--modes", *DEFAULT_VARIANTS, "graph-no-recompute",
                          "graph-malloc", "graph-saved-trace")}
RUNS = [("mlp", 32), ("mlp", 64), ("mobilenet_v2", 32), ("mobilenet_v2", 64)]
# The cold runs are there for the first calls: the compiled variants only, a few steps, an empty inductor cache
# per variant, each in its own process; twice, in opposite orders, so that neither side always compiles first.
COLD_VARIANTS = ("graph", "torch-compile", "fwd-bwd-compile")
COLD = ("--steps", "3", "--warmup", "1", "--cold-cache")


def result_stem(model: str, batch: int, cold: str = "", keep_freed_memory: bool = False) -> str:
    """The file name (without extension) that records hardware, torch version, compile mode, model and batch;
    cold: "" for the timed run, "cold" or "cold_reversed" for the cold first-call runs; `_keep_freed_memory` at
    the end for a run with `dualmode bench --keep-freed-memory`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    version = torch.__version__.split("+")[0]
    return (f"cpu-{cores}core_torch{version}_{BACKEND}_{model}_b{batch}" + (f"_{cold}" if cold else "")
            + ("_keep_freed_memory" if keep_freed_memory else ""))


def wait_until_quiet(threshold: float, max_wait_s: float) -> float | None:
    """Wait until other processes keep less than `threshold` of the cores busy (5 s samples); return that share."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = ForeignLoad([])
        load.start()
        time.sleep(5)
        share = load.stop()
        if share is None or share < threshold or time.monotonic() > deadline:
            print(f"run_all: foreign load {share} (threshold {threshold})", file=sys.stderr, flush=True)
            return share
        print(f"run_all: machine busy ({share:.0%} of the cores taken by others), waiting", file=sys.stderr,
              flush=True)


def record(model: str, batch: int, cold: str, args: argparse.Namespace) -> int:
    """Run one configuration through `dualmode bench` and write its JSON and plot into results/."""
    stem = os.path.join(RESULTS, result_stem(model, batch, cold, args.keep_freed_memory))
    order = COLD_VARIANTS[::-1] if cold == "cold_reversed" else COLD_VARIANTS
    how = (*COLD, "--modes", *order) if cold else STEPS[model]
    if args.keep_freed_memory:
        how = (*how, "--keep-freed-memory")
    argv = ["--model", model, "--batch-size", str(batch), *how, "--backend", BACKEND,
            "--json", stem + ".json", "--plot", stem + ".png"]
    parser = argparse.ArgumentParser(prog="dualmode bench")
    bench.add_arguments(parser)
    wait_until_quiet(args.quiet, args.max_wait)
    return bench.run(parser.parse_args(argv))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true",
                        help="first record mobilenet_v2 b64 with empty caches, twice, in opposite variant orders")
    parser.add_argument("--only", nargs="+", metavar="MODEL_bBATCH", help="record only these, e.g. mlp_b64")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="run every variant with `dualmode bench --keep-freed-memory`, into files ending in "
                             "_keep_freed_memory")
    parser.add_argument("--readme-only", action="store_true", help="only rewrite results/README.md")
    parser.add_argument("--quiet", type=float, default=0.15,
                        help="start a run when others use less than this share of the cores (default: 0.15)")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for that (default: 600)")
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    failed = 0
    if not args.readme_only:
        runs = ([("mobilenet_v2", 64, c) for c in ("cold", "cold_reversed")] if args.cold else [])
        runs += [(m, b, "") for m, b in RUNS]
        for model, batch, cold in runs:
            if args.only and f"{model}_b{batch}" not in args.only:
                continue
            failed += record(model, batch, cold, args) != 0
    write_readme(RESULTS, "python benchmarks/run_all.py --cold")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
