"""Inductor's once-per-process checks: in a background thread while graph mode traces the step, or at once
before the trace when no probe is left to run (probe_record.py).

Whatever it compiles or loads from its cache, inductor's first CPU compile in a process builds (if its cache
lacks them) and loads a probe library for each vector instruction set the CPU reports, each load in a Python
subprocess (`cpu_vec_isa.pick_vec_isa`), and hashes torch's own sources for its cache keys
(`codecache.torch_key`). Both are cached for the process and mostly wait on gcc, subprocesses and files, so they
overlap with the trace, which is Python on one core; and the probes, one after another in inductor, run here
one thread per instruction set, so their gcc builds share the cores. Measured in a slow spell of this machine
(docs/bench.md, round 6): the probes took 1.6 s with inductor's cache warm, 10.3 s with it empty (5.3 to 6.3 s
in parallel); MobileNetV2's warm first call went from 10.0 to 9.3 s (medians of seven alternating pairs).
A probe that passed is not run again in a later process with the same compiler, CPU and torch (probe_record.py).

Their results are what inductor would compute itself, cached where inductor looks for them: a failure is left
for inductor to meet again and report, and a user's `cpp.vec_isa_ok` (which changes the probes' answer) skips
them. The compile waits for the thread (compile.CompiledStep), so inductor never runs them at the same time.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import threading
import time

import torch

from dualmode.graph.probe_record import ProbeRecord, answers_from_record, probe_and_record


class BackendWarmUp:
    """The checks for one compile: in a daemon thread if a probe must run (`wait()` joins it), else at once."""

    def __init__(self, options: dict, examples: list):
        extra = options.get("options") or {}
        cpu = any(isinstance(e, torch.Tensor) and e.device.type == "cpu" for e in examples)
        self.probes = cpu and "cpp.vec_isa_ok" not in extra
        # What the threads run is imported here: imports running in two threads at once can deadlock on a
        # cycle. The probes' build imports cpp_extension (and setuptools with it), even when nothing is built.
        self.isas, self.ready = [], False
        with contextlib.suppress(Exception):  # a failing import is inductor's to report, when it compiles
            from torch._inductor import codecache, cpu_vec_isa  # noqa: F401

            if self.probes:
                from torch._inductor import cpp_builder  # noqa: F401  (the probes' key reads the compiler)
                from torch._inductor.runtime import cache_dir_utils  # noqa: F401
                from torch.utils import cpp_extension  # noqa: F401

                self.isas = candidate_isas()
            self.ready = True
        self.record = ProbeRecord.in_inductors_cache() if self.isas else None
        with contextlib.suppress(Exception):
            if self.isas and answers_from_record(self.isas, self.record):  # passed here before, same compiler
                self.isas = []
        self.thread, self.at_once_s = None, 0.0
        if self.isas:
            self.thread = threading.Thread(target=self._run, name="dualmode-inductor-warm-up", daemon=True)
            self.thread.start()
        else:  # a tenth of a second: in a thread, it waited for the trace's Python and slowed it (the GIL)
            start = time.perf_counter()
            self._run()
            self.at_once_s = time.perf_counter() - start

    def _run(self) -> None:
        if not self.ready:
            return
        from torch._inductor import codecache, cpu_vec_isa

        probes = [threading.Thread(target=_probe, args=(isa, self.record), name=f"dualmode-probe-{isa}", daemon=True)
                  for isa in self.isas]
        for probe in probes:
            probe.start()
        with contextlib.suppress(Exception):
            codecache.torch_key()
        for probe in probes:  # all done before inductor's pick, and before wait() returns
            probe.join()
        if self.record is not None:
            self.record.save()
        if self.probes:
            with contextlib.suppress(Exception):
                cpu_vec_isa.pick_vec_isa()  # now from the probes' cached answers

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()

    @staticmethod
    def start(options: dict, examples: list) -> BackendWarmUp | None:
        """The warm-up for a step compiled with inductor, else None."""
        return BackendWarmUp(options, examples) if options.get("backend", "inductor") == "inductor" else None


def candidate_isas() -> list:
    """The instruction sets inductor probes on this CPU (x86 only: elsewhere its own sequential probe runs).

    The same choice as `cpu_vec_isa.valid_vec_isa_list`: those of its list whose flags the CPU reports."""
    if sys.platform not in ("linux", "win32") or platform.machine() not in ("x86_64", "AMD64"):
        return []
    from torch._inductor import cpu_vec_isa

    flags = cpu_vec_isa.x86_isa_checker()
    return [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]


def _probe(isa, record: ProbeRecord) -> None:
    with contextlib.suppress(Exception):
        probe_and_record(isa, record)  # builds and loads its probe library; inductor caches the answer
