"""Building a C++-wrapped CPU step's library on every core.

With the C++ wrapper and `cpp_wrapper_build_separate` (compile.with_cpp_wrapper), inductor builds a CPU step as
two objects linked into one library: the wrapper (the step's host code, one long function) at -O1 and the
kernels at -O3, one gcc call after the other. The kernel source is a run of self-contained blocks, each
beginning with the include of inductor's prefix header, so it splits at those includes into pieces that compile
at the same time, each in a gcc process of its own, while the wrapper compiles too. The library is linked from
the same code and flags; only how many objects it is linked from changes.

Measured on MobileNetV2 b64's step (docs/bench.md, round 7; gcc user seconds, one at a time, in a slow spell):
wrapper and kernels as one -O3 build 44.7 s; wrapper at -O1 10.3 s, kernels 15.6 s; each extra piece re-reads
the prefix header, about 2.5 s.

`parallel_builds()` puts `build` in place of inductor's `codecache._worker_compile_cpp` while graph mode
compiles. Any other build (inductor's per-kernel libraries, or anything this module does not recognise) goes to
inductor's own function unchanged; a build from pieces that fails is done again as inductor does it, with a
warning in the log, so that only a real compile error is raised, as inductor raises it.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

from torch._inductor import codecache, config, cpp_builder
from torch._inductor.exc import CppCompileError

from dualmode.graph.early_build import active, early_builds
from dualmode.graph.progress import LOGGER

KERNEL_START = "#include <torch/csrc/inductor/cpp_prefix.h>\n"
# The least source a piece is cut for: each piece re-reads the prefix header (about 2.5 s), and gcc compiled
# MobileNetV2's 1.2 MB of kernels in about 13 s more, so a piece under about 200 kB costs more than it saves.
MIN_PIECE = 200_000


def split_kernels(source: str, parts: int) -> list[str]:
    """`source` in at most `parts` pieces of about equal length and at least MIN_PIECE characters, cut only where
    a kernel's block begins; the whole source when it does not begin with a block or has fewer than two."""
    head, *blocks = source.split(KERNEL_START)
    parts = min(parts, len(blocks), len(source) // MIN_PIECE)
    if head.strip() or parts < 2:
        return [source]
    size, done, pieces = len(source) / parts, len(head), [[] for _ in range(parts)]
    for block in (KERNEL_START + block for block in blocks):
        pieces[min(int((done + len(block) / 2) // size), parts - 1)].append(block)  # where its middle falls
        done += len(block)
    pieces = ["".join(piece) for piece in pieces if piece]
    pieces[0] = head + pieces[0]
    return pieces


def workers() -> int:
    """The gcc processes to run at once: inductor's `compile_threads` (TORCHINDUCTOR_COMPILE_THREADS)."""
    return max(1, int(config.compile_threads or 1))


def kernel_pieces(threads: int) -> int:
    """How many pieces the kernels are cut into for `threads` gcc processes at once. The wrapper takes about as
    long as two thirds of MobileNetV2's kernels, so with 2 threads the wrapper and 3 pieces share the two lanes
    better than the wrapper and 2 pieces (about 17 against 19 s by the figures above: an estimate, not a
    measurement); one thread, one piece."""
    return 1 if threads < 2 else 2 * threads - 1


def _plain(builder) -> str | None:
    """The one source file of a builder this module may rebuild, or None."""
    source = getattr(builder, "_sources_args", None)
    usable = (not getattr(builder, "_use_relative_path", True) and getattr(builder, "_orig_source_paths", 1) == []
              and isinstance(source, str) and os.path.isfile(source))
    return source if usable else None


def _run(builder) -> None:
    # What CppBuilder.build does, without inductor's `dynamo_timed`, whose event stack is not for threads.
    os.makedirs(builder._output_dir, exist_ok=True)
    temp = os.path.join(builder._output_dir, f"{builder._name}_dualmode_build")
    os.makedirs(temp, exist_ok=True)
    try:
        cpp_builder._run_compile_cmd(builder.get_command_line(), cwd=temp)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(temp)


def _split_builds(wrapper, kernels, linker) -> tuple[list, list, object] | None:
    """The builders still to run (the wrapper's and each kernel piece's), the kernels compiled already
    (early_build.py), and the linker of all their objects; None where the triple is not inductor's
    wrapper-and-kernels build as this module knows it."""
    kernel_source = _plain(kernels)
    names = ("_name", "_output_dir", "_build_option", "_target_file")
    if (_plain(wrapper) is None or kernel_source is None or not all(hasattr(b, n) for b in (wrapper, kernels,
                                                                                              linker) for n in names)
            or not (wrapper._compile_only and kernels._compile_only and linker._do_link)):
        return None
    with open(kernel_source) as file:
        source = file.read()
    early = active()
    taken = early.take(source, kernels) if early is not None else None
    runs, rest = taken or ([], source)
    pieces = split_kernels(rest, kernel_pieces(workers())) if rest.strip() else []
    if not runs and len(pieces) == 1:  # the kernels' own builder, as inductor has it
        return [wrapper, kernels], [], linker
    stem = os.path.splitext(kernel_source)[0]
    builders = [wrapper]
    for index, piece in enumerate(pieces):
        path = f"{stem}.part{index}.cpp"
        with open(path, "w") as file:
            file.write(piece)
        builders.append(cpp_builder.CppBuilder(name=f"{kernels._name}.part{index}", sources=path,
                                               BuildOption=kernels._build_option, output_dir=kernels._output_dir))
    objects = [b.get_target_file_path() for b in builders] + [run.builder.get_target_file_path() for run in runs]
    linker = cpp_builder.CppBuilder(name=linker._name, sources=objects, BuildOption=linker._build_option,
                                    output_dir=linker._output_dir)
    return builders, [run.done for run in runs], linker


def build(lock_path: str, cpp_builders) -> None:
    """Inductor's `_worker_compile_cpp`, with the wrapper and the kernel pieces compiled at once. If that fails
    (a kernel that needs another's code, say), the library is built as inductor builds it, whose error stands."""
    if len(cpp_builders) != 3:
        return _original(lock_path, cpp_builders)
    from torch.utils._filelock import FileLock

    with FileLock(lock_path, timeout=codecache.LOCK_TIMEOUT):
        if os.path.exists(cpp_builders[-1].get_target_file_path()):
            return None
        split = _split_builds(*cpp_builders)
        if split is not None and _built(*split):
            return None
    return _original(lock_path, cpp_builders)  # it takes the lock itself, and skips what exists already


def _built(builders: list, compiled: list, linker) -> bool:
    """Whether the objects still to build, the ones compiled already and the link all succeeded."""
    try:
        with ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="dualmode-gcc") as pool:
            for done in compiled + [pool.submit(_run, builder) for builder in builders]:
                done.result()  # the first failure, with gcc's output
        _run(linker)
        return True
    except CppCompileError as error:
        LOGGER.warning("graph mode: building the step's library from %d objects at once failed, so it is built as "
                       "inductor builds it: %s", len(builders) + len(compiled), str(error).splitlines()[0][:300])
        return False


_original = getattr(codecache, "_worker_compile_cpp", None)  # torch 2.13's; None: inductor builds as it does


@contextlib.contextmanager
def parallel_builds():
    """`build` in place of inductor's `_worker_compile_cpp` (module-level: load_async looks it up at each call),
    with kernels compiled as they are generated (early_build.py)."""
    if _original is None or codecache._worker_compile_cpp is not _original:  # nested, or not ours to touch
        yield
        return
    codecache._worker_compile_cpp = build
    try:
        with early_builds(workers(), _run):
            yield
    finally:
        codecache._worker_compile_cpp = _original
