"""`dualmode bench`: time one training step in eager and graph mode, with plain PyTorch as reference points.

Each variant (variants.py) runs in a worker process of its own (worker.py), so that its peak memory
is its own. The workers are set up one after another (the first call compiles, and is timed alone), then
stepped round-robin, one timed step per variant per round, starting each round with the next variant, so that
drift of a shared machine hits all variants alike. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from dualmode.apps.bench import report as bench_report
from dualmode.apps.bench.channel import Worker, WorkerError
from dualmode.apps.bench.machine import ForeignLoad, machine_info
from dualmode.apps.bench.ranks import Ranks, default_threads
from dualmode.apps.bench.variants import DEFAULT_VARIANTS, MODELS, VARIANTS, BenchSettings
from dualmode.apps.launch import Launch

PAUSE_MS = 50
NAME = "bench"
HELP = "Time one training step in eager and graph mode against plain PyTorch (forward+backward as the floor)."


def _at_least(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dualmode bench`."""
    parser.add_argument("--model", choices=MODELS, default="mlp", help="model to train (default: mlp)")
    parser.add_argument("--batch-size", type=_at_least(1), default=64, help="samples per step (default: 64)")
    parser.add_argument("--steps", type=_at_least(1), default=20, help="timed steps per variant (default: 20)")
    parser.add_argument("--warmup", type=_at_least(0), default=3,
                        help="untimed steps per variant after the first call (default: 3)")
    parser.add_argument("--modes", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS),
                        metavar="VARIANT", help=f"variants to run: {', '.join(VARIANTS)} "
                        f"(default: all but {', '.join(sorted(set(VARIANTS) - set(DEFAULT_VARIANTS)))})")
    parser.add_argument("--json", metavar="FILE", help="write settings, machine and all results as JSON")
    parser.add_argument("--plot", metavar="FILE", help="draw a bar chart of the step times (needs matplotlib)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune (default: none)")
    parser.add_argument("--hidden", type=_at_least(1), default=512, help="hidden width of the mlp (default: 512)")
    parser.add_argument("--threads", type=_at_least(1), default=default_threads(),
                        help="torch threads in each variant (default: the core count, divided by the ranks on this "
                             f"machine under torchrun: {default_threads()})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the batch (default: 0)")
    parser.add_argument("--pause-ms", type=_at_least(0), default=PAUSE_MS,
                        help="idle time before each timed step, so that the threads of the variant that ran before "
                             f"have gone to sleep (default: {PAUSE_MS})")
    parser.add_argument("--burst", type=_at_least(1), default=1,
                        help="timed steps per variant per round, back to back; above 1, each turn starts with one "
                             "untimed step (use it for steps of a few ms, which the pause would disturb; default: 1)")
    parser.add_argument("--cold-cache", action="store_true",
                        help="give each variant an empty inductor cache, so first calls compile from scratch")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="every variant's process first calls dm.keep_freed_memory(), so that glibc keeps freed "
                             "memory and a step reuses its buffers instead of faulting in fresh pages")


def _progress(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(f"bench: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print the table to stdout (progress to stderr); write --json and --plot.

    Under torchrun every rank runs every variant on its slice of the global batch; rank 0 alone prints and writes.
    """
    with Launch.from_env() as launch:
        return _run(args, launch)


def _run(args: argparse.Namespace, launch: Launch) -> int:
    try:
        launch.shard_size(args.batch_size)
    except ValueError as error:
        if launch.main:
            print(f"dualmode bench: error: {error}", file=sys.stderr)
        return 2
    settings = BenchSettings(model=args.model, hidden=args.hidden, batch_size=args.batch_size, seed=args.seed,
                             backend=args.backend, compile_mode=args.compile_mode,
                             keep_freed_memory=args.keep_freed_memory, distributed=launch.distributed,
                             world_size=launch.world, rank=launch.rank)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    ranks = Ranks(launch)
    _progress(f"{args.model}, batch {args.batch_size}{_per_rank(settings)}, variants {' '.join(args.modes)}; "
              f"load average {machine['load_average_before'][0]:.2f} on {machine['usable_cores']} cores")
    cache_root = tempfile.mkdtemp(prefix="dualmode-bench-cache-") if args.cold_cache else None
    workers, results = {}, {name: {"summary": VARIANTS[name].summary} for name in args.modes}
    try:
        for name in args.modes:
            workers[name] = Worker(name, settings, args.threads,
                                   None if cache_root is None else os.path.join(cache_root, name))
        ranks.share_pids(workers)
        for name in list(workers):
            _call(workers, results, name, None)
        ranks.agree(workers, results)
        for name in args.modes:
            if name in workers:  # not dropped on another rank meanwhile
                _first_call(workers, results, name, ranks)
                ranks.agree(workers, results)
        times, machine["foreign_load_timed_rounds"] = _rounds(workers, results, args, ranks)
        for name in list(workers):
            reply = _call(workers, results, name, "finish")
            if reply:
                results[name].update(reply)
                results[name].update(bench_report.summarize(times[name], args.batch_size))
                results[name]["cache_state"] = bench_report.cache_state(reply["cache"])
        ranks.agree(workers, results)
        for name in ranks.compare_checksums(results):
            _progress(f"WARNING: {name}: the parameters differ between the ranks after the steps (checksums "
                      f"{results[name]['rank_checksums']}); DistributedDataParallel should leave them equal")
    finally:
        for worker in workers.values():
            worker.close()
        if cache_root is not None:
            shutil.rmtree(cache_root, ignore_errors=True)
    failed = any("error" in v for v in results.values())
    if not launch.main:
        return 1 if failed else 0
    result = _assemble(args, settings, machine, results)
    print(bench_report.format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        _progress(f"wrote {args.json}")
    if args.plot:
        bench_report.write_plot(result, args.plot)
        _progress(f"wrote {args.plot}")
    return 1 if failed else 0


def _per_rank(settings: BenchSettings) -> str:
    if not settings.distributed:
        return ""
    return f" ({settings.batch_size // settings.world_size} per rank on {settings.world_size} ranks)"


def _call(workers: dict, results: dict, name: str, command: str | None) -> dict | None:
    """Ask one worker; on failure record the error under the variant, drop the worker and return None."""
    try:
        return workers[name].ask(command)
    except WorkerError as error:
        _progress(f"FAILED: {error}")
        results[name]["error"] = str(error)
        workers.pop(name).close()
        return None


def _first_call(workers: dict, results: dict, name: str, ranks: Ranks) -> None:
    """Build the variant and make its first call (which compiles), alone on the machine as far as we go."""
    _progress(f"{name}: first call (build{', trace and compile' if VARIANTS[name].compiles else ''}) ...")
    load = ForeignLoad(ranks.pids([name]))
    load.start()
    reply = _call(workers, results, name, "setup")
    if reply:
        reply["foreign_load"] = load.stop()
        results[name].update(reply)
        _progress(f"{name}: first call {reply['first_call_s']:.2f} s (foreign load {reply['foreign_load']})")


def _rounds(workers: dict, results: dict, args: argparse.Namespace, ranks: Ranks) -> tuple[dict, float | None]:
    """Warm-up rounds, a memory mark, then timed rounds: `burst` steps per variant per round, rotating the start.

    With burst > 1, each variant's turn starts with one untimed step, which absorbs the wake-up after its pause.
    Under torchrun the ranks agree on the failed variants after each round (every rank runs the same rounds).

    Returns the step times of each variant and the foreign load over the timed rounds.
    """
    warmup, burst = args.warmup, args.burst
    times: dict[str, list[float]] = {name: [] for name in workers}
    load = ForeignLoad(ranks.pids(workers))
    rounds = -(-args.steps // burst)
    for r in range(warmup + rounds):
        if r == warmup:
            for name in list(workers):
                _call(workers, results, name, "mark")
            ranks.agree(workers, results)
            load.start()
        names = list(workers)
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            time.sleep(args.pause_ms / 1000)
            reply = _call(workers, results, name, f"step {burst} {1 if burst > 1 else 0}")
            if reply and r >= warmup:
                times[name] += reply["s"]
        ranks.agree(workers, results)
        if r < warmup:
            _progress(f"warm-up round {r + 1}/{warmup}")
        else:
            _progress(f"round {r - warmup + 1}/{rounds}: " + ", ".join(
                f"{n} {times[n][-1] * 1000:.1f} ms" for n in names if n in workers and times[n]))
    return times, load.stop()


def _assemble(args: argparse.Namespace, settings: BenchSettings, machine: dict, results: dict) -> dict:
    """Everything the run measured, as one JSON-ready dict."""
    machine["load_average_after"] = list(os.getloadavg())
    eager = results.get("eager", {}).get("median_ms")
    for v in results.values():
        if "median_ms" in v:
            v["speedup_vs_eager"] = eager / v["median_ms"] if eager else None
    return {
        "schema": "dualmode-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(args),
        "settings": {**vars(settings), "per_rank_batch": settings.batch_size // settings.world_size,
                     "steps": args.steps, "warmup": args.warmup, "modes": list(args.modes),
                     "threads": args.threads, "pause_ms": args.pause_ms, "burst": args.burst,
                     "inductor_cache": "cold (empty per variant)" if args.cold_cache
                     else "shared (whatever the user's cache holds; see each variant's cache_state)"},
        "machine": machine,
        "notes": {
            "timing": "one turn per variant per round, round-robin, the first variant rotating; a turn is `burst` "
                      "timed steps (after one untimed step when burst > 1); each time is one call of the step, "
                      "in its worker process, perf_counter around the call",
            "foreign_load": "share of the machine's cores busy with processes other than this benchmark's "
                            "(from /proc/stat), over the timed rounds (machine) and over each first call",
            "ranks": "under torchrun (distributed): every rank runs every variant on its slice of the global batch "
                     "(per_rank_batch), its model in DistributedDataParallel over the variant's own process group; "
                     "times and memory are rank 0's, samples_per_s is the global batch over rank 0's median step; "
                     "ranks_agree: every rank's parameter checksum after the steps is the same",
            "first_call_s": "the first call of the step after building it: tracing, compiling and one step",
            "memory": "resident set size (Linux VmHWM) of the variant's own process, minus its RSS after the imports "
                      "(torch, torch._inductor) and a tiny warm-up backward, before the model was built; "
                      "peak_timed_steps_mb is reset after warm-up; page_faults_per_step: minor page faults per timed "
                      "step (memory the allocator gave back to the OS and touched again)",
            "cache_state": "from torch's inductor counters: cold = compiled from scratch, warm = loaded from the "
                           "FX graph / AOTAutograd caches, none = nothing compiled with inductor",
        },
        "variants": results,
        "targets": bench_report.targets(settings.model, results, settings.batch_size),
    }


def command_line(args: argparse.Namespace) -> str:
    """The `dualmode bench` command that repeats this run (threads and seed only when not the default)."""
    local = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE"))
    torchrun = f"torchrun --nproc_per_node {local} -m " if "WORLD_SIZE" in os.environ else ""
    parts = [torchrun + "dualmode bench", f"--model {args.model}", f"--batch-size {args.batch_size}",
             f"--steps {args.steps}", f"--warmup {args.warmup}", f"--backend {args.backend}"]
    if args.modes != list(DEFAULT_VARIANTS):
        parts.append("--modes " + " ".join(args.modes))
    if args.compile_mode:
        parts.append(f"--compile-mode {args.compile_mode}")
    if args.model == "mlp" and args.hidden != 512:
        parts.append(f"--hidden {args.hidden}")
    if args.burst != 1:
        parts.append(f"--burst {args.burst}")
    if args.pause_ms != PAUSE_MS:
        parts.append(f"--pause-ms {args.pause_ms}")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    if args.cold_cache:
        parts.append("--cold-cache")
    if args.keep_freed_memory:
        parts.append("--keep-freed-memory")
    return " ".join(parts)
