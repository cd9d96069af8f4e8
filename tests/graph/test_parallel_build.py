"""The C++-wrapped CPU step's library built from several objects at once (parallel_build.py): where the kernel
source is cut, that the linked library works and says what failed, and that graph mode builds its step so."""

import ctypes
import glob
import os
from concurrent.futures import Future

import pytest
import torch
from torch._inductor import codecache
from torch._inductor.cpp_builder import CppBuilder, CppOptions, CppTorchOptions
from torch._inductor.exc import CppCompileError

import dualmode as dm
from dualmode.graph import early_build, parallel_build
from dualmode.graph.parallel_build import KERNEL_START, build, kernel_pieces, parallel_builds, split_kernels
from tests.steps import Step, assert_same_state, batches, snapshot, tiny_groups, tiny_net


def kernel(name: str, value: int) -> str:
    return KERNEL_START + f'extern "C" int {name}() {{ return {value}; }}\n'


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(parallel_build, "MIN_PIECE", 1)


def test_the_source_is_cut_only_where_a_kernel_begins_into_about_equal_pieces(small_pieces):
    source = "\n\n" + "".join(kernel(f"k{i}", i) for i in range(6))
    pieces = split_kernels(source, 3)
    assert pieces == ["\n\n" + kernel("k0", 0) + kernel("k1", 1), kernel("k2", 2) + kernel("k3", 3),
                      kernel("k4", 4) + kernel("k5", 5)]
    uneven = [kernel(f"k{i}", i) + "// body\n" * (40 if i == 0 else 1) for i in range(7)]
    pieces = split_kernels("".join(uneven), 3)
    assert "".join(pieces) == "".join(uneven) and len(pieces) == 3
    assert pieces[0] == uneven[0] and all(piece.startswith(KERNEL_START) for piece in pieces)
    assert len(split_kernels(source, 100)) <= 6  # at most one piece per kernel


def test_a_source_not_made_of_kernel_blocks_or_too_short_stays_whole(small_pieces, monkeypatch):
    two = kernel("a", 1) + kernel("b", 2)
    assert split_kernels("int helper();\n" + two, 2) == ["int helper();\n" + two]  # code before the first block
    assert split_kernels(kernel("a", 1), 2) == [kernel("a", 1)]
    assert split_kernels(two, 1) == [two]
    monkeypatch.setattr(parallel_build, "MIN_PIECE", len(two))  # two pieces would each be under the least size
    assert split_kernels(two, 2) == [two]


def test_pieces_per_compile_thread():
    # One thread: inductor's one kernel build. Two: the wrapper and three pieces (docs/bench.md, round 7).
    assert [kernel_pieces(n) for n in (1, 2, 4)] == [1, 3, 7]


def builders(tmp_path, kernels: str, wrapper: str):
    """What load_async hands `_worker_compile_cpp` for a wrapper and kernels (plain C++ here)."""
    (tmp_path / "w.cpp").write_text(wrapper)
    (tmp_path / "k.cpp").write_text(kernels)
    out = str(tmp_path)
    return (CppBuilder("w", str(tmp_path / "w.cpp"), CppOptions(compile_only=True), out),
            CppBuilder("k", str(tmp_path / "k.cpp"), CppTorchOptions(compile_only=True), out),
            CppBuilder("w", [str(tmp_path / "w.o"), str(tmp_path / "k.o")], CppOptions(), out))


WRAPPER = 'extern "C" int k0(); extern "C" int k1(); extern "C" int k2();\nextern "C" int entry() { return k0() + 10 * k1() + 100 * k2(); }\n'  # noqa: E501


@pytest.mark.inductor
def test_the_pieces_and_the_wrapper_link_into_a_library_that_works(tmp_path, small_pieces, monkeypatch):
    monkeypatch.setattr(parallel_build, "workers", lambda: 2)
    started = []
    run = parallel_build._run
    monkeypatch.setattr(parallel_build, "_run", lambda b: (started.append(b._name), run(b)))
    triple = builders(tmp_path, kernel("k0", 1) + kernel("k1", 2) + kernel("k2", 3), WRAPPER)
    build(str(tmp_path / "lock"), triple)
    assert started == ["w", "k.part0", "k.part1", "k.part2", "w"]  # wrapper, three pieces, then the link
    assert ctypes.CDLL(triple[2].get_target_file_path()).entry() == 321
    build(str(tmp_path / "lock"), triple)  # the library exists: nothing is built again
    assert len(started) == 5


@pytest.mark.inductor
def test_a_piece_that_fails_raises_gccs_error_and_leaves_no_library(tmp_path, small_pieces, caplog):
    triple = builders(tmp_path, kernel("k0", 1) + KERNEL_START + "this is not C++\n", WRAPPER)
    with pytest.raises(CppCompileError, match="this is not C"):  # inductor's own build of it, after the pieces'
        build(str(tmp_path / "lock"), triple)
    assert not os.path.exists(triple[2].get_target_file_path())
    assert "built as inductor builds it" in caplog.text


@pytest.mark.inductor
def test_kernels_that_cannot_be_built_apart_are_built_as_inductor_builds_them(tmp_path, small_pieces, caplog):
    shared = KERNEL_START + 'static int helper() { return 1; }\nextern "C" int k0() { return helper(); }\n'
    uses = KERNEL_START + 'extern "C" int k1() { return helper() + 1; }\n'  # helper() is in another piece
    triple = builders(tmp_path, shared + uses + kernel("k2", 3), WRAPPER)
    build(str(tmp_path / "lock"), triple)
    assert ctypes.CDLL(triple[2].get_target_file_path()).entry() == 321
    assert "built as inductor builds it" in caplog.text


def test_other_builds_go_to_inductor(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(parallel_build, "_original", lambda lock, b: seen.append(b))
    single = (CppBuilder("one", str(tmp_path / "one.cpp"), CppOptions(), str(tmp_path)),)
    build(str(tmp_path / "lock"), single)
    assert seen == [single]


def test_kernel_texts_add_up_to_the_wrapper_kernel_declarations():
    from torch._inductor.utils import IndentedBuffer

    bodies = [kernel("a", 1), kernel("b", 2) + "  \n\n    // indented\n", "\n" + kernel("c", 3)]
    declarations = IndentedBuffer()
    for body in bodies:  # as CppWrapperCpu._define_kernel_helper writes them
        declarations.splice(f"\n{body}\n")
    assert declarations.getvalue() == "".join(early_build.as_declared(body) for body in bodies)


def early_run(tmp_path, text: str, option) -> early_build.Run:
    (tmp_path / "run.cpp").write_text(text)
    done = Future()
    done.set_result(None)
    return early_build.Run(text, CppBuilder("run", str(tmp_path / "run.cpp"), option, str(tmp_path)), done)


def test_runs_are_used_only_where_their_text_and_command_are_the_kernels(tmp_path):
    option = early_build.kernels_build_option()
    kernels = CppBuilder("k", str(tmp_path / "k.cpp"), option, str(tmp_path))
    early = early_build.EarlyBuilds(2, lambda builder: None)
    a, b = early_run(tmp_path, kernel("a", 1), option), early_run(tmp_path, kernel("b", 2), option)
    early.runs = {1: [a, b]}
    assert early.take(kernel("a", 1) + "\n" + kernel("b", 2) + kernel("c", 3), kernels) == ([a, b], kernel("c", 3))
    assert early.take(kernel("a", 1) + kernel("x", 0) + kernel("b", 2), kernels) == ([a], kernel("x", 0) +
                                                                                      kernel("b", 2))
    assert early.take(kernel("b", 2), kernels) is None  # not from the start
    early.runs = {1: [early_run(tmp_path, kernel("a", 1), CppOptions(compile_only=True))]}
    assert early.take(kernel("a", 1), kernels) is None  # compiled with other flags
    early.close()


def test_only_graph_modes_compile_gets_the_parallel_build():
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu

    original, define = codecache._worker_compile_cpp, CppWrapperCpu.define_kernel
    with parallel_builds():
        assert codecache._worker_compile_cpp is build and CppWrapperCpu.define_kernel is not define
        with parallel_builds():  # nested: left as it is
            assert codecache._worker_compile_cpp is build
        assert codecache._worker_compile_cpp is build
    assert codecache._worker_compile_cpp is original and CppWrapperCpu.define_kernel is define
    assert early_build.active() is None


def test_one_compile_thread_compiles_nothing_while_inductor_generates(monkeypatch):
    monkeypatch.setattr(parallel_build, "workers", lambda: 1)
    with parallel_builds():
        assert codecache._worker_compile_cpp is build and early_build.active() is None


def graph_and_eager_with_inductor():
    """A tiny step compiled from an empty inductor cache; the graph step's code and both modes' final state."""
    from torch._inductor.utils import fresh_cache, run_and_get_code

    results = {}
    with fresh_cache():
        for mode in ("eager", "graph"):
            model = tiny_net()
            step = Step(model, torch.optim.SGD(tiny_groups(model), lr=0.1, momentum=0.9), mode=mode,
                        config=dm.StepConfig())
            data = batches(3)
            _, code = run_and_get_code(step, *data[0])
            for x, y in data[1:]:
                step(x, y)
            results[mode] = snapshot(step)
            if mode == "graph":
                yield code[0]
    assert_same_state(results["eager"], results["graph"])


@pytest.mark.inductor
def test_graph_mode_builds_its_cpu_step_from_pieces_and_matches_eager(small_pieces, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.setattr(parallel_build, "workers", lambda: 2)
    monkeypatch.setattr(early_build, "RUN_SIZE", 10**9)  # nothing compiled before the end
    for code in graph_and_eager_with_inductor():
        assert "kernel_code=kernel_src" in code  # wrapper and kernels built apart
        assert len(glob.glob(os.path.join(cache_dir(), "**", "*.part1.o"), recursive=True)) == 1


@pytest.mark.inductor
def test_kernels_compiled_while_inductor_generates_are_linked_in(small_pieces, monkeypatch):
    monkeypatch.setattr(early_build, "RUN_SIZE", 1)  # a run per kernel
    seen = []
    take = early_build.EarlyBuilds.take

    def spy(self, source, kernels):
        taken = take(self, source, kernels)
        seen.append((sum(map(len, self.runs.values())), taken, self.directory))
        return taken

    monkeypatch.setattr(early_build.EarlyBuilds, "take", spy)
    for _ in graph_and_eager_with_inductor():
        pass
    (started, (runs, rest), directory), = seen
    assert started == len(runs) > 1 and not rest.strip()  # every kernel's run is in the library
    assert not os.path.exists(directory)  # the runs' files are gone after the compile


def test_a_run_that_cannot_start_leaves_the_kernels_to_the_build_at_the_end(monkeypatch):
    def broken():
        raise RuntimeError("no vector ISA")

    monkeypatch.setattr(early_build, "RUN_SIZE", 1)
    monkeypatch.setattr(early_build, "kernels_build_option", broken)
    early = early_build.EarlyBuilds(2, lambda builder: None)
    early.add(object(), kernel("a", 1))
    early.add(object(), kernel("b", 2))
    assert early.failed and not early.runs and early.take(kernel("a", 1), None) is None
    early.close()
