"""Keeping freed CPU memory in the process, so that each training step reuses its buffers instead of faulting them in.

glibc's malloc serves a large request (above a threshold that grows only up to 32 MiB) with a fresh `mmap` and
gives it back to the kernel when freed; it also trims freed memory at the top of its heap. A CPU training step
frees and allocates the same activation buffers at every step, so every step touches fresh pages again, each a
page fault and a page of zeros: MobileNetV2 at batch 64 took 39,000 to 288,000 faults per step by variant
(docs/performance.md). `keep_freed_memory()` raises the mmap threshold and turns the trimming off (`mallopt`),
so freed memory stays mapped and the next step reuses it. The price: the process keeps its peak resident size until it
exits (glibc reuses that memory for later requests, it does not give it back).

It changes the whole process, so nothing calls it for you: call it once before training. Where it cannot be
done (no glibc), or where the environment already chose (one of glibc's variables for these settings, or an
allocator loaded with `LD_PRELOAD`), it changes nothing and says why in a warning.
"""

from __future__ import annotations

import ctypes
import os
import warnings

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 30  # requests above 1 GiB still get an mmap of their own
NO_TRIM = -1  # M_TRIM_THRESHOLD -1: never trim (mallopt(3))
CHOSEN_BY_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_applied = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse in this process, so a CPU training step stops faulting in
    fresh pages for its buffers at every step (MobileNetV2 b64 on 2 cores: graph mode 11 to 15 % faster, eager
    mode 19 to 23 %, with eager's peak memory 5 to 10 % higher; docs/performance.md).

    It changes malloc for the whole process, until it exits: call it once, before training.

    Args:
        None.

    Returns:
        True once malloc keeps freed memory (a second call changes nothing). False where it is left as it is:
        not glibc, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_` or `GLIBC_TUNABLES` set
        (the environment chose), or an allocator in `LD_PRELOAD` (jemalloc, tcmalloc and mimalloc keep freed
        memory by their own rules).

    Raises:
        Nothing: where malloc is left as it is, a RuntimeWarning says why.

    Example:
        >>> import dualmode as dm
        >>> kept = dm.keep_freed_memory()  # once, before training
        >>> kept == dm.keep_freed_memory()  # a second call changes nothing
        True
    """
    global _applied
    if _applied:
        return True
    libc, reason = _glibc()
    if reason is None:
        if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
            reason = "glibc's mallopt refused the mmap threshold"
        elif libc.mallopt(M_TRIM_THRESHOLD, NO_TRIM) != 1:
            reason = "glibc's mallopt refused to turn the trimming off (the mmap threshold of 1 GiB is set)"
    if reason is not None:
        warnings.warn(f"dualmode.keep_freed_memory: malloc left as it is: {reason}", RuntimeWarning, stacklevel=2)
        return False
    _applied = True
    return True


def _glibc() -> tuple[ctypes.CDLL | None, str | None]:
    """The C library this process runs on, or why malloc is to be left as it is."""
    chosen = [name for name in CHOSEN_BY_ENVIRONMENT if name in os.environ]
    if chosen:
        return None, f"the environment sets {', '.join(chosen)}"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return None, f"LD_PRELOAD loads another allocator ({preload})"
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows: no such handle
        return None, "the C library could not be loaded"
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None, "the C library is not glibc"
    return libc, None
