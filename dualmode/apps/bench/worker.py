"""One benchmark variant in a process of its own, stepped by `dualmode bench` over a pipe.

Each variant gets its own process so that its memory is its own: the peak resident set size of a process
(Linux's VmHWM) covers everything torch allocates on the CPU, which tracemalloc does not see. The parent
sends one command per line on stdin and reads one JSON reply per line; the reply channel is a copy of the
original stdout, and stdout itself is pointed at stderr, so nothing torch prints can corrupt the replies.

Under torchrun the workers of one variant, one per rank, form a process group of their own (ranks.py) at
"setup", so that the variant's DistributedDataParallel reduces over them alone.

Commands: "setup" (build the step and make the first call, which compiles), "step N U" (U untimed calls, then
N timed calls back to back), "mark"
(end of warm-up: note the peak so far and reset it), "finish" (report compiles, caches and memory; exit).
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time


def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    status = _proc_status()
    if status is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # best effort: the peak
    return status["VmRSS"] / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or since the last `reset_peak()`, in MiB."""
    status = _proc_status()
    if status is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return status["VmHWM"] / 1024


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux: write 5 to /proc/self/clear_refs); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status() -> dict[str, int] | None:
    try:
        with open("/proc/self/status") as f:
            text = f.read()
    except OSError:
        return None
    found = dict(re.findall(r"^(VmHWM|VmRSS):\s+(\d+) kB", text, flags=re.MULTILINE))
    if len(found) != 2:
        return None
    return {k: int(v) for k, v in found.items()}


def checksum(model) -> dict:
    """Sums over all parameters in float64: equal on every rank after DDP, and across variants that train alike."""
    import torch

    import dualmode as dm

    flat = torch.cat([p.detach().double().flatten() for p in dm.bare_model(model).parameters()])
    return {"sum": float(flat.sum()), "sum_abs": float(flat.abs().sum()), "sum_sq": float(flat.square().sum())}


class VariantProcess:
    """The state of one variant inside its worker: the step, its batch, timings and memory marks."""

    def __init__(self, name: str, settings: dict, threads: int):
        import torch

        from dualmode.apps.bench.variants import VARIANTS, BenchSettings

        torch.set_num_threads(threads)
        _load_lazily_loaded_parts(torch)
        self.variant = VARIANTS[name]
        self.settings = BenchSettings(**settings)
        if self.settings.keep_freed_memory:
            import dualmode as dm

            if not dm.keep_freed_memory():  # its warning says why; a run asked for it must not time without it
                raise RuntimeError("--keep-freed-memory: malloc was left as it is (see the warning above)")
        self.baseline_mb = rss_mb()
        self.step = None
        self.batch = None
        self.compiles_after_first_call = 0
        self.peak_warmup_mb = None
        self.peak_reset = False
        self.faults_at_mark = None
        self.steps_since_mark = 0

    def setup(self) -> dict:
        from dualmode.apps.bench.ranks import join_variant_group
        from dualmode.apps.bench.variants import make_batch

        joined = time.perf_counter()
        if self.settings.distributed:
            join_variant_group(self.variant.name)
        start = time.perf_counter()
        self.step = self.variant.make(self.settings)
        self.batch = make_batch(self.settings)
        built = time.perf_counter()
        self.step(*self.batch)
        done = time.perf_counter()
        self.compiles_after_first_call = self._compiles()
        reply = {"build_s": built - start, "first_call_s": done - built}
        if self.settings.distributed:
            reply["join_s"] = start - joined
        explain = getattr(self.step, "explain", None)
        if explain is not None and self.step.mode == "graph" and self.step.compile_count:
            first = explain().compiles[0]
            reply["trace_s"] = first.trace_s
            if first.trace_source:  # config.trace_cache: loaded, saved, or why neither
                reply["trace_source"] = first.trace_source
        return reply

    def time_steps(self, timed: str = "1", untimed: str = "0") -> dict:
        """Make `untimed` calls, then `timed` calls, each timed alone; return those times (seconds)."""
        for _ in range(int(untimed)):
            self.step(*self.batch)
        times = []
        for _ in range(int(timed)):
            start = time.perf_counter()
            self.step(*self.batch)
            times.append(time.perf_counter() - start)
        self.steps_since_mark += int(untimed) + int(timed)
        return {"s": times}

    def mark(self) -> dict:
        self.peak_warmup_mb = peak_rss_mb() - self.baseline_mb
        self.peak_reset = reset_peak()
        self.faults_at_mark = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.steps_since_mark = 0
        return {}

    def finish(self) -> dict:
        from torch._dynamo.utils import counters

        compiles = self._compiles()
        peak_now = peak_rss_mb() - self.baseline_mb
        faults = None
        if self.faults_at_mark is not None and self.steps_since_mark:
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults_at_mark) / self.steps_since_mark
        return {
            "compiles": compiles,
            "compiles_after_first_call": compiles - self.compiles_after_first_call,
            "graph_breaks": sum(counters["graph_break"].values()),
            "cache": {
                "fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
                "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
                "aot_autograd_hit": counters["aot_autograd"]["autograd_cache_hit"],
                "aot_autograd_miss": counters["aot_autograd"]["autograd_cache_miss"],
            },
            "checksum": checksum(self.step.model),
            "memory": {
                "baseline_mb": self.baseline_mb,
                "peak_through_warmup_mb": self.peak_warmup_mb if self.peak_warmup_mb is not None else peak_now,
                "peak_timed_steps_mb": peak_now if self.peak_reset else None,
                "rss_end_mb": rss_mb() - self.baseline_mb,
                "page_faults_per_step": faults,
            },
        }

    def _compiles(self) -> int:
        from torch._dynamo.utils import counters

        if getattr(self.step, "mode", None) == "graph":
            return self.step.compile_count
        return counters["frames"]["ok"]


def _load_lazily_loaded_parts(torch) -> None:
    """Import the compiler and run one tiny backward, so that neither first calls nor memory growth count them.

    Every variant does this, compiled or not: timings and memory then start from the same point, and the
    memory growth is the step's own (data, compiled code), not the ~110 MiB of torch._inductor's modules.
    """
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401

    x = torch.randn(8, 8, requires_grad=True)
    (x @ x).relu().sum().backward()


def main(argv: list[str]) -> int:
    """Serve one variant: argv is [variant name, settings as JSON, thread count]."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed from here on goes to stderr, never into the replies

    def reply(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    try:
        name, settings, threads = argv[0], json.loads(argv[1]), int(argv[2])
        process = VariantProcess(name, settings, threads)
    except Exception as error:  # reported to the parent, which names the variant
        reply({"error": f"{type(error).__name__}: {error}"})
        return 1
    reply({"ready": True})
    handlers = {"setup": process.setup, "step": process.time_steps, "mark": process.mark, "finish": process.finish}
    for line in sys.stdin:
        command, *arguments = line.split()
        handler = handlers.get(command)
        if handler is None:
            reply({"error": f"unknown command {command!r}"})
            continue
        try:
            reply(handler(*arguments))
        except Exception as error:
            reply({"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"})
        if command == "finish":
            break
    if process.settings.distributed:
        from dualmode.apps.bench.ranks import leave_variant_group

        leave_variant_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
