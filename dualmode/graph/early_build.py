"""Compiling a C++-wrapped CPU step's kernels while inductor still generates the rest of the step.

Inductor generates a step's kernels one after another (MobileNetV2: 20 s of `Scheduler.codegen` in a slow spell
of this machine), then the wrapper, and only then builds the library (parallel_build.py). Each kernel's C++ is
final when it is generated (`define_kernel`), and the generating is Python on one core: so runs of kernels,
once RUN_SIZE characters of them are generated, compile in the background on the other cores meanwhile.

A run is used only if its text is exactly a stretch of the kernel source inductor finally builds, from its start
or right after the previous run, and its gcc command line is exactly the kernels' own but for the file names;
else the runs are dropped and the source is built as if there were none. Either way, every run has finished
and its files are gone when the compile ends (`EarlyBuilds.close`).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from torch._inductor import codecache, config, cpp_builder
from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
from torch._inductor.utils import IndentedBuffer

# MobileNetV2's step has 1.2 MB of kernels, generated over about 20 s; runs of 300 kB (about 6 s of gcc each,
# the prefix header included) keep one core compiling while inductor generates, and leave less than one run
# for the end.
RUN_SIZE = 300_000


@dataclass
class Run:
    text: str
    builder: cpp_builder.CppBuilder
    done: Future


def kernels_build_option() -> cpp_builder.CppTorchDeviceOptions:
    """The build option inductor gives a C++ wrapper's kernels (`CppCodeCache.load_async`, compile only)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return cpp_builder.CppTorchDeviceOptions(
        compile_only=True, device_type="cpu", extra_flags=(), use_relative_path=config.is_fbcode(),
        vec_isa=pick_vec_isa(), **codecache.CppWrapperCodeCache.cpp_compile_command_flags)


def as_declared(body: str) -> str:
    """A kernel's text as the wrapper's kernel declarations hold it (`_define_kernel_helper`)."""
    buffer = IndentedBuffer()
    buffer.splice(f"\n{body}\n")
    return buffer.getvalue()


def same_command(run: cpp_builder.CppBuilder, kernels: cpp_builder.CppBuilder) -> bool:
    """Whether `run` is compiled exactly as `kernels` is, but for its source and object."""
    as_kernels = cpp_builder.CppBuilder(name=kernels._name, sources=kernels._sources_args,
                                        BuildOption=run._build_option, output_dir=kernels._output_dir)
    return as_kernels.get_command_line() == kernels.get_command_line()


class EarlyBuilds:
    """The runs of one graph-mode compile, for each wrapper being generated."""

    def __init__(self, workers: int, run_builder):
        self.run_builder = run_builder
        # One gcc fewer than the compile threads: inductor's Python keeps one core.
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers - 1), thread_name_prefix="dualmode-early-gcc")
        self.pending: dict[int, list[str]] = {}
        self.runs: dict[int, list[Run]] = {}
        self.directory: str | None = None
        self.option = None
        self.failed = False

    def add(self, wrapper: CppWrapperCpu, body: str) -> None:
        if self.failed:
            return
        texts = self.pending.setdefault(id(wrapper), [])
        texts.append(as_declared(body))
        if sum(map(len, texts)) >= RUN_SIZE:
            try:
                self._start(id(wrapper), "".join(texts))
            except Exception:  # no more runs: the build at the end compiles what they would have
                self.failed = True
            texts.clear()

    def _start(self, wrapper: int, text: str) -> None:
        if self.directory is None:
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            self.directory = tempfile.mkdtemp(prefix="dualmode-early-", dir=cache_dir())
            self.option = kernels_build_option()
        runs = self.runs.setdefault(wrapper, [])
        name = f"run{wrapper}_{len(runs)}"
        path = f"{self.directory}/{name}.cpp"
        with open(path, "w") as file:
            file.write(text)
        builder = cpp_builder.CppBuilder(name=name, sources=path, BuildOption=self.option, output_dir=self.directory)
        runs.append(Run(text, builder, self.pool.submit(self.run_builder, builder)))

    def take(self, source: str, kernels: cpp_builder.CppBuilder) -> tuple[list[Run], str] | None:
        """The runs that make up the start of `source`, and the rest of it; None when no run does."""
        for runs in self.runs.values():
            used, at = [], 0
            for run in runs:
                found = source.find(run.text, at)
                if found < 0 or source[at:found].strip() or not same_command(run.builder, kernels):
                    break
                used.append(run)
                at = found + len(run.text)
            if used:
                return used, source[at:]
        return None

    def close(self) -> None:
        self.pool.shutdown(wait=True)  # no gcc left running after the compile
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


_active: EarlyBuilds | None = None
_own = CppWrapperCpu.__dict__.get("define_kernel")  # None: inherited from PythonWrapperCodegen
_inherited = CppWrapperCpu.define_kernel


def _define_kernel(self, kernel_name, kernel_body, metadata=None, gpu=True, cpp_definition=None):
    # The wrapper only notes the kernel here, during the scheduler's code generation; its text goes into the
    # kernel declarations later, when the wrapper itself is generated.
    _inherited(self, kernel_name, kernel_body, metadata=metadata, gpu=gpu, cpp_definition=cpp_definition)
    # A CPU kernel of the C++ wrapper of a JIT compile (not AOTInductor, not another wrapper class).
    if _active is not None and cpp_definition is not None and not gpu and type(self) is CppWrapperCpu:
        from torch._inductor.virtualized import V

        if not V.graph.aot_mode and config.cpp_wrapper_build_separate:
            _active.add(self, kernel_body)


def active() -> EarlyBuilds | None:
    return _active


@contextlib.contextmanager
def early_builds(workers: int, run_builder):
    """Kernels compiled as inductor generates them (by `run_builder`), for the duration of one compile; not with a
    single compile thread, which leaves no core to compile on meanwhile."""
    global _active
    if workers < 2 or _active is not None or CppWrapperCpu.define_kernel is not _inherited:
        yield
        return
    _active = EarlyBuilds(workers, run_builder)
    CppWrapperCpu.define_kernel = _define_kernel
    try:
        yield
    finally:
        early, _active = _active, None
        if _own is None:
            del CppWrapperCpu.define_kernel
        else:
            CppWrapperCpu.define_kernel = _own
        early.close()
