"""The machine a benchmark ran on, and how busy other work kept it (the machine may be shared).

`ForeignLoad` measures, over an interval, the CPU time that the whole machine spent busy (Linux /proc/stat)
minus the CPU time of the benchmark's own processes: what is left is other people's work, as a share of the
cores. A share near 0 means the timings are undisturbed; 0.5 means half the machine was taken by others.
"""

from __future__ import annotations

import os
import platform
import time

import torch

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info() -> dict:
    """CPU model, cores, memory, software versions and the load average now."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu_model": cpu, "cores": os.cpu_count(), "usable_cores": usable_cores(), "memory_gb": _memory_gb(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_before": list(os.getloadavg())}


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


def busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (all cores), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already counted in user and nice
    return (sum(fields) - idle - guest) / _TICKS


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads, reaped children included) of one process; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / _TICKS  # utime, stime, cutime, cstime


class ForeignLoad:
    """The share of the machine's cores that processes other than `pids` kept busy between start() and stop()."""

    def __init__(self, pids: list[int]):
        self.pids = list(pids) + [os.getpid()]
        self._start = None

    def _sample(self):
        return time.perf_counter(), busy_cpu_s(), {pid: process_cpu_s(pid) for pid in self.pids}

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float | None:
        """The foreign share of the cores since start(), in [0, 1]; None where /proc is not available."""
        (t0, busy0, own0), (t1, busy1, own1) = self._start, self._sample()
        if busy0 is None or busy1 is None or t1 <= t0:
            return None
        own = sum(own1[pid] - own0[pid] for pid in self.pids if own1[pid] >= own0[pid])
        share = (busy1 - busy0 - own) / ((t1 - t0) * (os.cpu_count() or 1))
        return round(min(1.0, max(0.0, share)), 3)
