"""Inductor's once-per-process checks run in the background while the step is traced (graph/warm_up.py)."""

import subprocess
import sys
import threading

import pytest
import torch
from torch._inductor import codecache, cpu_vec_isa

from dualmode.graph import warm_up as warm_up_module
from dualmode.graph.compile import CompiledStep, CompileSplit
from dualmode.graph.warm_up import BackendWarmUp


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(warm_up_module, "candidate_isas", lambda: [])
    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda: seen.append("vec_isa"))
    monkeypatch.setattr(codecache, "torch_key", lambda: seen.append("torch_key"))
    return seen


def finished(warm_up: BackendWarmUp | None) -> BackendWarmUp | None:
    if warm_up is not None:
        warm_up.wait()
    return warm_up


def test_with_no_probe_to_run_the_checks_run_at_once_without_a_thread(calls):
    # In a thread, a tenth of a second of checks waited on the trace's Python for the GIL, and slowed it.
    warm_up = BackendWarmUp.start({"backend": "inductor"}, [torch.ones(2), 0.1])
    assert warm_up.thread is None and calls == ["torch_key", "vec_isa"] and warm_up.at_once_s > 0.0
    finished(BackendWarmUp.start({}, [torch.ones(2)]))  # inductor is the default backend
    assert calls == ["torch_key", "vec_isa"] * 2


def test_a_probe_to_run_runs_in_the_background_with_the_other_checks(monkeypatch, calls):
    release = threading.Event()
    monkeypatch.setattr(warm_up_module, "candidate_isas", lambda: [SlowIsa(release)])
    warm_up = BackendWarmUp.start({}, [torch.ones(2)])
    assert warm_up.thread.name == "dualmode-inductor-warm-up" and warm_up.thread.is_alive()
    release.set()
    finished(warm_up)
    assert not warm_up.thread.is_alive() and calls == ["torch_key", "vec_isa"]


class SlowIsa:
    def __init__(self, release: threading.Event):
        self.release = release

    def __str__(self) -> str:
        return "slow"

    def __bool__(self) -> bool:
        return self.release.wait(10)


def test_another_backend_gets_none(calls):
    assert BackendWarmUp.start({"backend": "eager"}, [torch.ones(2)]) is None
    assert calls == []


def test_a_users_vec_isa_ok_or_no_cpu_tensor_skips_the_probes(calls):
    # The probes' answer is cached for the process: computed outside the user's option, it would override it.
    finished(BackendWarmUp.start({"options": {"cpp.vec_isa_ok": False}}, [torch.ones(2)]))
    finished(BackendWarmUp.start({}, [torch.ones(2, device="meta"), 3]))
    assert calls == ["torch_key", "torch_key"]


def test_a_failing_check_is_left_for_inductor_to_report(monkeypatch, calls):
    def broken():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", broken)
    finished(BackendWarmUp.start({}, [torch.ones(2)]))  # no exception here, nothing cached
    assert calls == ["torch_key"]


def test_the_compile_starts_after_the_warm_up(monkeypatch):
    release, order = threading.Event(), []
    warm_up = BackendWarmUp.__new__(BackendWarmUp)
    warm_up.thread = threading.Thread(target=lambda: (release.wait(5), order.append("warm-up done")))
    warm_up.at_once_s = 0.25  # checks run before the trace count too
    warm_up.thread.start()
    gm = torch.fx.symbolic_trace(lambda x: x * 2)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta["val"] = torch.ones(2)
    step = CompiledStep(gm, {"backend": "eager"}, warm_up)

    def compiler(graph, examples):
        order.append("compile")
        return graph

    step.compiler = compiler
    threading.Timer(0.05, release.set).start()
    assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
    assert order == ["warm-up done", "compile"]
    assert step.wait_s > 0.25  # explain() shows it
    shown = str(CompileSplit(aot_s=1.0, inductor_s=2.0, kernels=3, checks_s=step.wait_s - 0.25 + 0.01))
    assert shown.startswith("no dynamo, inductor's per-process checks 0.") and "s more, AOTAutograd 1.00 s" in shown
    assert "checks" not in str(CompileSplit(checks_s=0.001))


def test_the_thread_imports_nothing_in_a_fresh_process():
    # Imports running in two threads at once can deadlock on a cycle: what the thread runs is imported before.
    code = ("import sys, torch\n"
            "from dualmode.graph.warm_up import BackendWarmUp\n"
            "warm_up = BackendWarmUp.start({}, [torch.ones(2)])\n"
            "before = set(sys.modules)\n"
            "warm_up.wait()\n"
            "print(sorted(set(sys.modules) - before))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


class FakeIsa:
    """An instruction set whose probe only returns once the other one's has started."""

    def __init__(self, name: str, both_probing: threading.Barrier):
        self.name, self.both_probing = name, both_probing

    def __str__(self) -> str:
        return self.name

    def __bool__(self) -> bool:
        self.both_probing.wait()  # raises BrokenBarrierError after its timeout if the probes ran one by one
        return True


@pytest.mark.parametrize("hash_fails", [False, True])
def test_the_probes_run_one_thread_per_instruction_set_before_inductor_picks_from_their_answers(monkeypatch,
                                                                                               hash_fails):
    both = threading.Barrier(2, timeout=10)
    isas = [FakeIsa("avx512", both), FakeIsa("avx2", both), FakeIsa("neon", both)]
    monkeypatch.setattr(cpu_vec_isa, "supported_vec_isa_list", isas)
    monkeypatch.setattr(cpu_vec_isa, "x86_isa_checker", lambda: ["avx2", "avx512", "sse"])  # no neon
    monkeypatch.setattr(warm_up_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(warm_up_module.sys, "platform", "linux")
    assert warm_up_module.candidate_isas() == isas[:2]
    picked = []
    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda: picked.append(both.broken))
    monkeypatch.setattr(codecache, "torch_key", (lambda: 1 / 0) if hash_fails else (lambda: None))
    finished(BackendWarmUp.start({}, [torch.ones(2)]))
    assert picked == [False]  # both probes met at the barrier, and inductor's pick came after them


def test_no_candidates_off_x86(monkeypatch):
    monkeypatch.setattr(warm_up_module.platform, "machine", lambda: "aarch64")
    assert warm_up_module.candidate_isas() == []  # inductor's own sequential probe runs there
