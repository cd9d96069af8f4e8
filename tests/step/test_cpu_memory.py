"""dm.keep_freed_memory: freed buffers stay mapped (no page faults when the next step allocates them again), and
where malloc is left as it is, a warning says why."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

import dualmode as dm
from dualmode.step import cpu_memory

# Faults per allocation of a 40 MB tensor, filled, in steady state: without and then with keep_freed_memory.
SCRIPT = textwrap.dedent("""
    import resource, torch, dualmode as dm

    def faults_per_allocation(rounds=8):
        counts = []
        for _ in range(rounds):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = torch.empty(10 * 2**20)
            t.fill_(1.0)
            del t
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return min(counts[2:])  # after the heap has grown to hold it

    default = faults_per_allocation()
    kept = dm.keep_freed_memory()
    print(default, kept, faults_per_allocation())
""")


def glibc() -> bool:
    libc = ctypes.CDLL(None)
    return hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")


@pytest.mark.skipif(not glibc(), reason="keep_freed_memory changes glibc's malloc only")
def test_freed_buffers_are_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=env,
                         check=True).stdout.split()
    default, kept, after = int(out[0]), out[1], int(out[2])
    pages = 10 * 2**20 * 4 // 4096
    assert default >= pages * 0.9  # glibc's default: a fresh mmap each time, every page faulted in
    assert kept == "True"
    assert after <= pages * 0.01


@pytest.fixture
def not_applied(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", False)
    for name in cpu_memory.CHOSEN_BY_ENVIRONMENT + ("LD_PRELOAD",):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("name, value", [("MALLOC_TRIM_THRESHOLD_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.x=1")])
def test_the_environments_choice_stands(not_applied, name, value):
    not_applied.setenv(name, value)
    with pytest.warns(RuntimeWarning, match=f"malloc left as it is: the environment sets {name}"):
        assert dm.keep_freed_memory() is False
    assert cpu_memory._applied is False


def test_a_preloaded_allocator_stands(not_applied):
    not_applied.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    with pytest.warns(RuntimeWarning, match=r"LD_PRELOAD loads another allocator \(/usr/lib/libjemalloc.so.2\)"):
        assert dm.keep_freed_memory() is False


class _FakeLibc:
    def __init__(self, glibc: bool, accepts: tuple[int, ...] = (-3, -1)):
        if glibc:
            self.gnu_get_libc_version = lambda: b"2.36"
        self.calls = []
        self.mallopt = lambda param, value: self.calls.append((param, value)) or int(param in accepts)


@pytest.mark.parametrize("glibc_, accepts, reason", [
    (False, (-3, -1), "the C library is not glibc"),
    (True, (), "glibc's mallopt refused the mmap threshold"),
    (True, (-3,), r"glibc's mallopt refused to turn the trimming off \(the mmap threshold of 1 GiB is set\)")])
def test_what_cannot_be_done_is_said(not_applied, glibc_, accepts, reason):
    libc = _FakeLibc(glibc_, accepts)
    not_applied.setattr(cpu_memory.ctypes, "CDLL", lambda name: libc)
    with pytest.warns(RuntimeWarning, match=reason):
        assert dm.keep_freed_memory() is False
    assert cpu_memory._applied is False


def test_the_settings_are_glibcs_mmap_threshold_and_no_trimming(not_applied):
    libc = _FakeLibc(True)
    not_applied.setattr(cpu_memory.ctypes, "CDLL", lambda name: libc)
    assert dm.keep_freed_memory() is True
    assert libc.calls == [(-3, 1 << 30), (-1, -1)]  # M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD -1 (mallopt(3))
    assert dm.keep_freed_memory() is True and len(libc.calls) == 2  # once per process
