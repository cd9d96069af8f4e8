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
import subprocess
import sys
import tempfile
import time

import torch

from dualmode.apps.bench import report as bench_report
from dualmode.apps.bench.machine import ForeignLoad, machine_info, usable_cores
from dualmode.apps.bench.variants import DEFAULT_VARIANTS, MODELS, VARIANTS, BenchSettings

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
    parser.add_argument("--threads", type=_at_least(1), default=usable_cores(),
                        help=f"torch threads in each variant (default: the core count, {usable_cores()})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the batch (default: 0)")
    parser.add_argument("--pause-ms", type=_at_least(0), default=PAUSE_MS,
                        help="idle time before each timed step, so that the threads of the variant that ran before "
                             f"have gone to sleep (default: {PAUSE_MS})")
    parser.add_argument("--burst", type=_at_least(1), default=1,
                        help="timed steps per variant per round, back to back; above 1, each turn starts with one "
                             "untimed step (use it for steps of a few ms, which the pause would disturb; default: 1)")
    parser.add_argument("--cold-cache", action="store_true",
                        help="give each variant an empty inductor cache, so first calls compile from scratch")


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


class WorkerError(RuntimeError):
    """A variant's worker process failed; the message names the variant."""


class Worker:
    """The parent's end of one variant's worker process."""

    def __init__(self, name: str, settings: BenchSettings, threads: int, cache_dir: str | None):
        self.name = name
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        if cache_dir is not None:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dualmode.apps.bench.worker", name, json.dumps(vars(settings)), str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, command: str | None) -> dict:
        """Send a command (None: only read the next reply) and return the reply; WorkerError on failure."""
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise WorkerError(f"variant {self.name!r}: its worker process exited (code {code}) during {command!r}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"variant {self.name!r}, {command or 'start'}: {reply['error']}")
        return reply

    def close(self) -> None:
        """End the worker (closing its stdin tells it to exit) and close the pipes."""
        try:
            self.process.stdin.close()
        except OSError:  # the worker is gone already
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


# What `dualmode bench` lacks to run under torchrun, said instead of running one process per rank unasked.
UNDER_TORCHRUN = (
    "dualmode bench: error: it runs under torchrun (WORLD_SIZE={world}) but does not support it yet: each variant "
    "runs in a worker process of its own, and those workers would need to join one process group per variant "
    "across the ranks. For data-parallel throughput, run benchmarks/distributed.py under torchrun (see "
    "docs/distributed.md), or `torchrun --nproc_per_node N -m dualmode tutorial`, which prints samples/s.")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print the table to stdout (progress to stderr); write --json and --plot."""
    if "WORLD_SIZE" in os.environ:
        print(UNDER_TORCHRUN.format(world=os.environ["WORLD_SIZE"]), file=sys.stderr)
        return 2
    settings = BenchSettings(model=args.model, hidden=args.hidden, batch_size=args.batch_size, seed=args.seed,
                             backend=args.backend, compile_mode=args.compile_mode)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    _progress(f"{args.model}, batch {args.batch_size}, variants {' '.join(args.modes)}; "
              f"load average {machine['load_average_before'][0]:.2f} on {machine['usable_cores']} cores")
    cache_root = tempfile.mkdtemp(prefix="dualmode-bench-cache-") if args.cold_cache else None
    workers, results = {}, {name: {"summary": VARIANTS[name].summary} for name in args.modes}
    try:
        for name in args.modes:
            workers[name] = Worker(name, settings, args.threads,
                                   None if cache_root is None else os.path.join(cache_root, name))
        for name in list(workers):
            _call(workers, results, name, None)
        for name in list(workers):
            _first_call(workers, results, name)
        times, machine["foreign_load_timed_rounds"] = _rounds(workers, results, args.warmup, args.steps,
                                                              args.pause_ms / 1000, args.burst)
        for name in list(workers):
            reply = _call(workers, results, name, "finish")
            if reply:
                results[name].update(reply)
                results[name].update(bench_report.summarize(times[name], args.batch_size))
                results[name]["cache_state"] = bench_report.cache_state(reply["cache"])
    finally:
        for worker in workers.values():
            worker.close()
        if cache_root is not None:
            shutil.rmtree(cache_root, ignore_errors=True)
    result = _assemble(args, settings, machine, results)
    print(bench_report.format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        _progress(f"wrote {args.json}")
    if args.plot:
        bench_report.write_plot(result, args.plot)
        _progress(f"wrote {args.plot}")
    return 1 if any("error" in v for v in results.values()) else 0


def _call(workers: dict, results: dict, name: str, command: str | None) -> dict | None:
    """Ask one worker; on failure record the error under the variant, drop the worker and return None."""
    try:
        return workers[name].ask(command)
    except WorkerError as error:
        _progress(f"FAILED: {error}")
        results[name]["error"] = str(error)
        workers.pop(name).close()
        return None


def _first_call(workers: dict, results: dict, name: str) -> None:
    """Build the variant and make its first call (which compiles), alone on the machine as far as we go."""
    _progress(f"{name}: first call (build{', trace and compile' if VARIANTS[name].compiles else ''}) ...")
    load = ForeignLoad([workers[name].process.pid])
    load.start()
    reply = _call(workers, results, name, "setup")
    if reply:
        reply["foreign_load"] = load.stop()
        results[name].update(reply)
        _progress(f"{name}: first call {reply['first_call_s']:.2f} s (foreign load {reply['foreign_load']})")


def _rounds(workers: dict, results: dict, warmup: int, steps: int, pause_s: float,
            burst: int) -> tuple[dict, float | None]:
    """Warm-up rounds, a memory mark, then timed rounds: `burst` steps per variant per round, rotating the start.

    With burst > 1, each variant's turn starts with one untimed step, which absorbs the wake-up after its pause.

    Returns the step times of each variant and the foreign load over the timed rounds.
    """
    times: dict[str, list[float]] = {name: [] for name in workers}
    load = ForeignLoad([w.process.pid for w in workers.values()])
    rounds = -(-steps // burst)
    for r in range(warmup + rounds):
        if r == warmup:
            for name in list(workers):
                _call(workers, results, name, "mark")
            load.start()
        names = list(workers)
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            time.sleep(pause_s)
            reply = _call(workers, results, name, f"step {burst} {1 if burst > 1 else 0}")
            if reply and r >= warmup:
                times[name] += reply["s"]
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
        "settings": {**vars(settings), "steps": args.steps, "warmup": args.warmup, "modes": list(args.modes),
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
            "first_call_s": "the first call of the step after building it: tracing, compiling and one step",
            "memory": "resident set size (Linux VmHWM) of the variant's own process, minus its RSS after the imports "
                      "(torch, torch._inductor) and a tiny warm-up backward, before the model was built; "
                      "peak_timed_steps_mb is reset after warm-up; page_faults_per_step: minor page faults per timed "
                      "step (memory the allocator gave back to the OS and touched again)",
            "cache_state": "from torch's inductor counters: cold = compiled from scratch, warm = loaded from the "
                           "FX graph / AOTAutograd caches, none = nothing compiled with inductor",
        },
        "variants": results,
        "targets": bench_report.targets(settings.model, results),
    }


def command_line(args: argparse.Namespace) -> str:
    """The `dualmode bench` command that repeats this run (threads and seed only when not the default)."""
    parts = ["dualmode bench", f"--model {args.model}", f"--batch-size {args.batch_size}", f"--steps {args.steps}",
             f"--warmup {args.warmup}", f"--backend {args.backend}"]
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
    return " ".join(parts)
