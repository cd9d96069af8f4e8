"""Graph mode's CPU step keeps the buffers it frees for its next call, as torch's CUDA allocator does on a GPU.

On the CPU, torch takes every tensor from malloc and gives it back when freed. glibc serves a request above its
mmap threshold (which grows only up to 32 MiB) with a fresh `mmap` and unmaps it when freed, and trims freed
memory at the top of its heap: a step that allocates and frees the same activations at every call touches fresh
pages again each time, one fault and a page of zeros per 4 KiB. MobileNetV2 b64's compiled step took 55,000 to
134,000 faults a step (docs/bench.md, rounds 10 and 11): a kernel that normalizes one 37.7 MB activation took
11.1 ms with a fresh output, 1.87 ms with a reused one.

`step_buffers.cpp` is a CPU allocator that passes every request through to the one it replaced, except those
of 128 KiB and more made on a thread inside a graph-mode call: those come from that TrainGraph's pool, which
keeps the blocks its tensors freed for the next call; a block serves a request of its size or down to half of it
(exact sizes alone held 1151 MiB at MobileNetV2 b64's peak, against 737; docs/bench.md, round 12). At the end
of a call, the blocks that were free when it began and that it did not take go back to malloc, so a pool holds
what one call used. Eager mode, the user's code between calls, and every other thread allocate as before.

The price is memory: between calls the process keeps the step's freed buffers (about the step's peak) instead
of giving them back. `config.reuse_buffers = False` gives them back at the next call and uses malloc alone.

The library is built with inductor's C++ compiler (1.3 to 1.5 s here) into inductor's cache directory, once per
torch version and compiler, and loaded with ctypes. Where that cannot be done (no compiler, a read-only cache,
not Linux) or another CPU allocator holds torch's slot, a RuntimeWarning says why, once, and the step allocates
from malloc as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("step_buffers.cpp")
BUILD_TIMEOUT_S = 120
_library: ctypes.CDLL | None = None
_failure: str | None = None  # why the library is not used, once it has been tried
MALLOC = contextlib.nullcontext()  # what a call without a pool enters


class StepBuffers:
    """One TrainGraph's pool: `with pool:` around a call of its compiled step, on the thread that calls it."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        self._pool = lib.dm_pool_new()
        self._release = weakref.finalize(self, lib.dm_pool_release, self._pool)

    def __enter__(self) -> None:
        if not self._lib.dm_pool_enter(self._pool):  # another allocator took torch's slot: none of it comes here
            _replaced()
            self.release()

    def __exit__(self, *exc) -> None:
        self._lib.dm_pool_exit(self._pool)

    @property
    def held_bytes(self) -> int:
        """The bytes of freed buffers the pool keeps for the next call."""
        return self._lib.dm_pool_held(self._pool)

    def release(self) -> None:
        """Give the pool's free buffers back to malloc; those still in tensors go back when the tensors are freed."""
        self._release()


class RunnerBuffers:
    """Where one TrainGraph's CPU step takes its buffers from: its pool while config.reuse_buffers holds."""

    def __init__(self):
        self.pool: StepBuffers | None = None
        self.unusable = False  # step_buffers() said why, once
        self.cpu_ran = False

    def for_call(self, cpu: bool, config) -> StepBuffers | contextlib.nullcontext:
        """The pool to enter for a call of a variant (`cpu`: all its tensor inputs on the CPU), or MALLOC: not a
        CPU step, config.reuse_buffers off (the pool, if any, given back), or the allocator unusable here."""
        self.cpu_ran = self.cpu_ran or cpu
        if not config.reuse_buffers:
            if self.pool is not None:
                self.pool.release()
                self.pool = None
            return MALLOC
        if self.pool is not None and _library is None:  # the allocator was replaced since (_replaced said so)
            self.pool.release()
            self.pool, self.unusable = None, True
        if self.pool is None and cpu and not self.unusable:
            self.pool = step_buffers()
            self.unusable = self.pool is None
        return self.pool if cpu and self.pool is not None else MALLOC

    def state(self) -> str | None:
        """Where the buffers come from, for explain(); None before a CPU variant ran."""
        if not self.cpu_ran:
            return None
        if self.pool is not None:
            return (f"reused between calls (step_buffers.py; {self.pool.held_bytes / 2**20:.1f} MiB freed by "
                    "the last call kept for the next)")
        if self.unusable:
            return f"from malloc at every call: its allocator could not be used: {_failure}"
        return "from malloc at every call (config.reuse_buffers=False)"


def step_buffers() -> StepBuffers | None:
    """A new pool, or None (with a RuntimeWarning, once per process, saying why) where the allocator cannot be
    used."""
    global _library, _failure
    if _library is None and _failure is None:
        try:
            lib = _load()
            if not lib.dm_install():
                raise RuntimeError("torch's CPU allocator is one it cannot stand in for (set with a higher priority, "
                                   "or without a raw deleter)")
            _library = lib
        except Exception as error:  # the step runs as before; the warning says why
            _failure = str(error)
            warnings.warn(f"dualmode: graph mode allocates its step's CPU buffers from malloc at every call (each "
                          f"step faults them in again): its allocator could not be used: {_failure}. "
                          "Set config.reuse_buffers = False to choose that without this warning.",
                          RuntimeWarning, stacklevel=5)
    if _library is None:
        return None
    if not _library.dm_installed():
        _replaced()
        return None
    return StepBuffers(_library)


def _replaced() -> None:
    """Say once that another CPU allocator replaced graph mode's since it was installed: every step's buffers
    come from that one from now on."""
    global _library, _failure
    if _library is not None:
        warnings.warn("dualmode: graph mode's CPU allocator was replaced after it was installed; its step "
                      "buffers come from malloc from now on", RuntimeWarning, stacklevel=5)
        _library, _failure = None, "torch's CPU allocator was replaced after it was installed"


def _load() -> ctypes.CDLL:
    """The built library, built first if inductor's cache directory lacks it."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"it is built for Linux only, this is {sys.platform}")
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    compiler = get_cpp_compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + torch.__version__.encode() + compiler.encode()).hexdigest()[:16]
    path = Path(cache_dir()) / "dualmode" / f"step_buffers_{key}.so"
    if not path.exists():
        _build(compiler, path)
    lib = ctypes.CDLL(str(path))
    for name, result, args in (("dm_install", ctypes.c_int, []), ("dm_installed", ctypes.c_int, []),
                               ("dm_pool_new", ctypes.c_void_p, []),
                               ("dm_pool_enter", ctypes.c_int, [ctypes.c_void_p]),
                               ("dm_pool_exit", None, [ctypes.c_void_p]),
                               ("dm_pool_held", ctypes.c_size_t, [ctypes.c_void_p]),
                               ("dm_pool_release", None, [ctypes.c_void_p])):
        function = getattr(lib, name)
        function.restype, function.argtypes = result, args
    return lib


def _build(compiler: str, path: Path) -> None:
    """Compile SOURCE into `path` (written under another name, then renamed: processes may build at once)."""
    torch_dir = Path(torch.__file__).parent
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               f"-I{torch_dir / 'include'}", str(SOURCE), f"-L{torch_dir / 'lib'}", "-lc10",
               f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(partial)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"{compiler} did not build {SOURCE.name}: {error}") from error
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-400:]}")
    os.replace(partial, path)
