"""Inductor's vector instruction set probes that passed on this machine, kept from one process to the next.

Inductor checks each instruction set the CPU reports once per process, by building a probe library (kept in
its cache) and loading it in a Python subprocess: 0.35 to 0.47 s each on an AMD EPYC with a warm cache, three of
them (avx512_vnni, avx512, avx2). They run in the background while the step is traced (warm_up.py), but on two
cores they slow the trace by as much as they save. Each build of a probe that passed is noted in inductor's
cache directory, under a key of everything its answer depends on: the compiler and its version, the
instruction set's flags and macros, torch's version and library, the CPU's flags, the Python executable, the
probe's source. In a later process inductor's own check runs, each of its builds answered from the record; one
not recorded (a difference in any of those, a build that failed, an unreadable file), and every probe runs as
inductor runs it, in the background. A new cache directory (TORCHINDUCTOR_CACHE_DIR) starts with no answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys

import torch

FILE = os.path.join("dualmode", "vec_isa_probes.json")


class ProbeRecord:
    """The keys of the probes that passed, read from and written to one file."""

    def __init__(self, path: str | None):
        self.path = path  # None: nothing read or written (no cache directory to keep it in)
        self.passed: set[str] = set()
        with contextlib.suppress(OSError, ValueError, TypeError):
            if path is not None:
                with open(path) as f:
                    self.passed = set(json.load(f)["passed"])
        self._known = frozenset(self.passed)

    @staticmethod
    def in_inductors_cache() -> ProbeRecord:
        try:
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            return ProbeRecord(os.path.join(cache_dir(), FILE))
        except Exception:  # no cache directory (read-only file system, say): the probes run, unrecorded
            return ProbeRecord(None)

    def save(self) -> None:
        """Write the file if a probe passed that it did not hold (atomically: another process may write too)."""
        if self.path is None or self.passed <= self._known:
            return
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            partial = f"{self.path}.{os.getpid()}.tmp"
            with open(partial, "w") as f:
                json.dump({"passed": sorted(self.passed)}, f)
            os.replace(partial, self.path)


class _NotRecorded(Exception):
    pass


def check_key(isa, code: str) -> str | None:
    """What one of the probe's builds (`isa.check_build(code)`, with the flags it has now) depends on, hashed;
    None where this torch does not say (then nothing is recorded)."""
    try:
        from torch._inductor import cpu_vec_isa

        parts = [cpu_vec_isa._get_isa_dry_compile_fingerprint(isa.build_arch_flags()),  # compiler, flags, torch
                 str(isa), " ".join(isa.build_macro()), " ".join(sorted(cpu_vec_isa.x86_isa_checker())),
                 os.path.dirname(torch.__file__), sys.executable, platform.machine(), code]
    except Exception:
        return None
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def answers_from_record(isas: list, record: ProbeRecord) -> bool:
    """Give inductor its per-process answer for each of `isas` (`bool(isa)`, cached) from recorded builds only;
    False, with every instance and inductor's answers as they were, if one of their builds is not recorded.

    `bool(isa)` is inductor's own: it may build more than once (avx512 then avx512_bf16), caching an inner answer
    (avx512's, for avx512_vnni) and setting flags on the instance as it goes; each build that passed before answers
    True here instead of running. All or none: a build not recorded leaves inner answers cached and flags half
    set, so they are all forgotten and every instruction set is probed (probe_and_record)."""
    from torch._inductor import cpu_vec_isa

    if not all(isinstance(isa, cpu_vec_isa.VecISA) and check_key(isa, cpu_vec_isa.VecISA._avx_code) in record.passed
               for isa in isas):
        return False  # not even every first build: no need to try

    def check_build(code: str) -> bool:
        if check_key(isa, code) not in record.passed:
            raise _NotRecorded
        return True

    saved = [dict(isa.__dict__) for isa in isas]
    try:
        for isa in isas:
            isa.check_build = check_build  # the instance's own, for this call only
            try:
                bool(isa)
            finally:
                del isa.check_build
        return True
    except Exception:  # _NotRecorded, or anything else: inductor's own probes will meet it
        for isa, state in zip(isas, saved):
            isa.__dict__.clear()
            isa.__dict__.update(state)
        _forget_answers(cpu_vec_isa.VecISA)
        return False


def _forget_answers(cls: type) -> None:
    """Clear inductor's cached `bool()` of `cls` and its subclasses (only answers this process has not used)."""
    for cached in (cls.__dict__.get("__bool__"), cls.__dict__.get("_VecISA__bool__impl")):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    for sub in cls.__subclasses__():
        _forget_answers(sub)


def probe_and_record(isa, record: ProbeRecord) -> None:
    """`bool(isa)` as inductor runs it (builds and loads in a subprocess), noting each build that passed."""
    build = getattr(isa, "check_build", None)
    if build is None:  # not built by inductor's VecISA: probed, nothing to record
        bool(isa)
        return

    def check_build(code: str) -> bool:
        key = check_key(isa, code)
        if key in record.passed:
            return True
        passed = build(code)
        if passed and key is not None:
            record.passed.add(key)  # one thread per instruction set: set.add holds the GIL
        return passed

    isa.check_build = check_build
    try:
        bool(isa)
    finally:
        isa.__dict__.pop("check_build", None)
