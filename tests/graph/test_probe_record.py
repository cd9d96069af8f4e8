"""A vector instruction set probe that passed is not run again by a later process (graph/probe_record.py)."""

import json

import pytest
import torch
from torch._inductor import cpu_vec_isa

from dualmode.graph import probe_record, warm_up
from dualmode.graph.probe_record import FILE, ProbeRecord
from dualmode.graph.warm_up import BackendWarmUp

ISAS = warm_up.candidate_isas()
needs_isas = pytest.mark.skipif(not ISAS, reason="inductor probes instruction sets on x86 only")


@pytest.fixture
def new_process(monkeypatch, tmp_path):
    """An empty inductor cache directory, a fake probe counting its runs, and inductor's per-process answers
    forgotten, as in a new process (and again at the end, so that later compiles probe for real)."""
    runs = []

    def check_build(isa, code):
        runs.append(str(isa))
        return outcome["passes"]

    outcome = {"passes": True}
    pristine = [dict(isa.__dict__) for isa in ISAS]

    def forget():
        for cls in _subclasses(cpu_vec_isa.VecISA):
            for cached in (cls.__dict__.get("__bool__"), cls.__dict__.get("_VecISA__bool__impl")):
                if hasattr(cached, "cache_clear"):
                    cached.cache_clear()
        for isa, state in zip(ISAS, pristine):
            isa.__dict__.clear()
            isa.__dict__.update(state)

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", check_build)
    forget()
    yield runs, forget, outcome, tmp_path / FILE
    monkeypatch.undo()
    forget()


def _subclasses(cls) -> list[type]:
    return [cls] + [c for sub in cls.__subclasses__() for c in _subclasses(sub)]


def answers() -> list:
    """Inductor's per-process answer for each instruction set, and what its probe set on the instance."""
    return [(bool(isa), isa.build_arch_flags(), {k: v for k, v in vars(isa).items() if k != "__hash__"})
            for isa in ISAS]


def started() -> BackendWarmUp:
    warm_up = BackendWarmUp.start({}, [torch.ones(2)])
    warm_up.wait()
    return warm_up


@needs_isas
def test_a_passed_probe_is_taken_from_the_record_in_a_later_process(new_process):
    runs, forget, _, path = new_process
    first = started()
    assert first.thread is not None and set(runs) == set(map(str, ISAS))  # probed in the background
    probed = answers()
    # Each build that passed: avx512's probe also builds for avx512_bf16, where the CPU has it, and so on.
    assert len(json.loads(path.read_text())["passed"]) == len(runs) >= len(ISAS)
    runs.clear()
    forget()  # a later process
    later = started()
    assert later.thread is None and runs == []  # no build, no subprocess, no thread
    assert answers() == probed and runs == []  # inductor's answers and flags, as the probes left them


@needs_isas
def test_a_different_compiler_cpu_or_torch_probes_again(new_process, monkeypatch):
    runs, forget, _, path = new_process
    started()
    builds = len(runs)
    runs.clear()
    forget()
    monkeypatch.setattr(cpu_vec_isa, "_get_isa_dry_compile_fingerprint", lambda flags: f"gcc 99={flags}=9.9")
    assert started().thread is not None and len(runs) == builds
    assert len(json.loads(path.read_text())["passed"]) == 2 * builds  # both machines' answers kept


@needs_isas
def test_a_failed_probe_is_not_recorded_and_runs_again(new_process):
    runs, forget, outcome, path = new_process
    outcome["passes"] = False
    started()
    assert not path.exists()
    forget()
    started()
    assert len(runs) == 2 * len(ISAS)
    assert not any(bool(isa) for isa in ISAS)  # inductor's own answer: failed


def test_an_unreadable_record_is_an_empty_one(tmp_path):
    path = tmp_path / "probes.json"
    for text in ("{not json", '{"passed": 3}', '["a"]'):
        path.write_text(text)
        assert ProbeRecord(str(path)).passed == set()
    assert ProbeRecord(str(tmp_path / "absent.json")).passed == set()


def test_the_record_is_written_only_with_a_new_pass(tmp_path):
    path = tmp_path / "d" / "probes.json"
    record = ProbeRecord(str(path))
    record.save()
    assert not path.exists()
    record.passed.add("k1")
    record.save()
    assert json.loads(path.read_text()) == {"passed": ["k1"]}
    again = ProbeRecord(str(path))
    path.write_text('{"passed": ["k1", "k2"]}')  # another process wrote since
    again.save()  # nothing new here: its file stands
    assert json.loads(path.read_text()) == {"passed": ["k1", "k2"]}


def test_no_key_where_this_torch_does_not_say(monkeypatch):
    monkeypatch.delattr(cpu_vec_isa, "_get_isa_dry_compile_fingerprint")
    assert probe_record.check_key(ISAS[0] if ISAS else object(), "int main() {}") is None


@needs_isas
def test_an_instruction_set_with_a_build_not_recorded_is_probed_whole_and_left_as_it_was(new_process):
    runs, forget, _, path = new_process
    started()
    probed, builds = answers(), len(runs)
    forget()
    first_builds = {probe_record.check_key(isa, cpu_vec_isa.VecISA._avx_code) for isa in ISAS}
    path.write_text(json.dumps({"passed": sorted(first_builds)}))  # each one's first build only
    runs.clear()
    started()
    # Where a probe builds more than once (avx512, then avx512_bf16) the first build alone did not answer it: its
    # probe ran, with the first build answered from the record and the others built.
    assert len(runs) == builds - len(ISAS)
    assert answers() == probed


def test_without_a_cache_directory_the_probes_run_unrecorded(monkeypatch, tmp_path):
    from torch._inductor.runtime import cache_dir_utils

    def read_only():
        raise PermissionError("read-only file system")

    monkeypatch.setattr(cache_dir_utils, "cache_dir", read_only)
    record = ProbeRecord.in_inductors_cache()
    assert record.path is None and record.passed == set()
    record.passed.add("k1")
    record.save()  # nowhere to write: nothing, and no error
    assert list(tmp_path.iterdir()) == []


@needs_isas
def test_any_one_build_not_recorded_probes_every_instruction_set_and_gives_the_probes_answers(new_process):
    # avx512_vnni's answer caches avx512's for it and sets its bf16 flag on the way: a later build not recorded
    # must not leave that inner answer cached with the flag put back (nor any other half-done answer).
    runs, forget, _, path = new_process
    started()
    probed, recorded = answers(), json.loads(path.read_text())["passed"]
    for missing in recorded:
        forget()
        path.write_text(json.dumps({"passed": [k for k in recorded if k != missing]}))
        runs.clear()
        assert started().thread is not None and len(runs) == 1  # the one build not recorded, in the background
        assert answers() == probed
