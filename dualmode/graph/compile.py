"""Compiling the traced step, and where the first call's time goes.

The traced GraphModule goes to the torch.compile backend directly (inductor's `compile_fx`, or whatever
backend the config names), with the trace's own fake inputs as examples, so their symbolic batch dimension
carries over. Dynamo is not involved: re-tracing a graph make_fx already traced cost MobileNetV2 about 9 s of
its cold first call and its guards about 0.8 ms per call, and what those guards checked is graph mode's own
cache key (fastpath.py, inputs.py) and the layout check of optimizer state and gradients (fetch.py). The
backend compiles on the first call, under inductor's recompute pass (remat.py); a CPU step with inductor's C++
wrapper, its wrapper and kernels compiled at the same time (`with_cpp_wrapper`, parallel_build.py).
Inductor's once-per-process checks run while the step is traced (warm_up.py); the compile waits for them.

Where the time goes: the backend call is timed here; inductor's own compile timer
(`torch._dynamo.utils.compilation_time_metrics["compile_fx_inner"]`, kept for the whole process) and kernel
counter, read before and after the first call, split it: AOTAutograd = the backend call minus inductor.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
from torch._dynamo.utils import compilation_time_metrics
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config
from torch._inductor import metrics as inductor_metrics

from dualmode.graph.parallel_build import parallel_builds
from dualmode.graph.remat import RecomputePass, installed
from dualmode.graph.warm_up import BackendWarmUp

INDUCTOR = "compile_fx_inner"
FUSION_PAIRS = 8  # fusion candidates per node and shared buffer (compiling)


class CompiledStep:
    """The traced step, compiled by the backend at its first call; `compile_s` is what that compile took."""

    def __init__(self, gm: torch.fx.GraphModule, options: dict, warm_up: BackendWarmUp | None = None):
        # make_fx leaves its ShapeEnv on the module; AOTAutograd's cache pickles the module's attributes for its
        # key and cannot pickle that, so it bypassed the cache (MobileNetV2: 11.5 s of AOTAutograd in every warm
        # first call). The fake inputs' own ShapeEnv is what the backend uses.
        gm.__dict__.pop("shape_env", None)
        self.gm = gm
        backend, mode = options.get("backend", "inductor"), options.get("mode")
        extra, dynamic = options.get("options"), options.get("dynamic")
        if backend == "inductor":
            extra = with_cpp_wrapper(gm, extra)
        # The compiler objects torch.compile itself builds from these options (mode and options become
        # inductor config patches).
        self.compiler = (torch._TorchCompileInductorWrapper(mode, extra, dynamic) if backend == "inductor"
                         else torch._TorchCompileWrapper(backend, mode, extra, dynamic))
        self.fn = None
        self.compile_s = 0.0
        self.wait_s = 0.0  # for the warm-up, after the trace
        self.warm_up = warm_up

    def __call__(self, *inputs):
        if self.fn is None:
            if self.warm_up is not None:
                start = time.perf_counter()
                self.warm_up.wait()
                self.wait_s = time.perf_counter() - start + self.warm_up.at_once_s  # those run before the trace
            examples = [node.meta["val"] for node in self.gm.graph.nodes if node.op == "placeholder"]
            start = time.perf_counter()
            self.fn = self.compiler(self.gm, examples)
            self.compile_s = time.perf_counter() - start
        # aot_autograd's callable takes the inputs one by one (its `_boxed_call` is copied from the inner one).
        return self.fn(*inputs)


# Inductor's options for a CPU step (with_cpp_wrapper), and the environment variables that set them.
CPU_BUILD = {"cpp_wrapper": True, "cpp_cache_precompile_headers": False, "cpp_wrapper_build_separate": True}
CPU_BUILD_ENV = ("TORCHINDUCTOR_CPP_WRAPPER", "TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS",
                 "TORCHINDUCTOR_CPP_WRAPPER_BUILD_SEPARATE")


def with_cpp_wrapper(gm: torch.fx.GraphModule, extra: dict | None) -> dict | None:
    """Inductor's options for a step whose tensors are all on the CPU: its C++ wrapper, built apart from the
    kernels and without a precompiled header, unless the user chose any of the three.

    By default inductor builds each CPU kernel as a shared library of its own, one gcc call each (0.64 s at
    least): MobileNetV2's step took 84 builds and 76 s of gcc, one at a time. With the C++ wrapper the
    kernels and the wrapper are one library: one gcc call of 26.5 s without the precompiled header, which one
    translation unit does not need (4 s more with it). Built apart (`cpp_wrapper_build_separate`), the wrapper,
    one long function, compiles at -O1 instead of -O3 (MobileNetV2: 10 s, kernels 16 s, against 45 s as one
    -O3 build, in a slow spell) and the kernels in pieces at the same time (parallel_build.py). Any of the
    keys in compile_options["options"], or any of the environment variables, and inductor's own settings
    stand.
    """
    chosen = any(key in (extra or {}) for key in CPU_BUILD) or any(name in os.environ for name in CPU_BUILD_ENV)
    if chosen:
        return extra
    devices = {node.meta["val"].device.type for node in gm.graph.nodes
               if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor)}
    if devices != {"cpu"}:
        return extra
    return {**(extra or {}), **{key: value for key, value in CPU_BUILD.items() if hasattr(inductor_config, key)}}


def compile_step(gm: torch.fx.GraphModule, options: dict, warm_up: BackendWarmUp | None = None) -> CompiledStep:
    """The compiled step of one traced graph (compiled at its first call, once `warm_up` is done)."""
    return CompiledStep(gm, options, warm_up)


@contextlib.contextmanager
def compiling(recompute: RecomputePass | None):
    """The settings of the call that compiles.

    Inductor's input size and stride asserts are off: every input's layout is checked before each call already
    (the cache key, the steady-state check, the layout check of optimizer state and gradients), and the asserts
    cost about 0.5 us per input and call (a 4-block MLP: 38).
    AOTAutograd's cache key reads the traced module's placeholder names as they are: it renames them only to
    match graphs dynamo named differently, and make_fx names them alike every time; the renaming recompiled the
    module twice (MobileNetV2: about 0.2 s of each first call, warm or cold).

    Inductor's fusion search pairs each node with at most FUSION_PAIRS (inductor: 64) of the later nodes that read
    a buffer it reads. Every parameter's update reads its group's lr and other scalars, so with inductor's 64 each
    update node was checked against 64 others in every fusion round: MobileNetV2's scheduler took 14.5 to 14.8 s
    (4.0 s for the same step without its update); with 8, 8.9 to 9.5 s, the same 690 kernels, the same step time.
    """
    with installed(recompute), inductor_config.patch(COMPILE_SETTINGS), parallel_builds(), \
            functorch_config.patch(AOT_SETTINGS):
        yield


def _known(config, settings: tuple) -> dict:
    """The settings this torch's config module has (an older torch may lack some)."""
    return {key: value for key, value in settings if hasattr(config, key)}


# Inductor's and AOTAutograd's settings while graph mode compiles (compiling); compile_options["options"] win.
COMPILE_SETTINGS = _known(inductor_config, (("size_asserts", False),
                                            ("max_fusion_buffer_group_pairwise_attempts", FUSION_PAIRS)))
AOT_SETTINGS = _known(functorch_config, (("autograd_cache_normalize_inputs", False),))


@dataclass
class CompileSplit:
    """The seconds of one first call spent waiting for inductor's per-process checks (BackendWarmUp), in
    AOTAutograd and in inductor, and the kernels generated."""

    aot_s: float = 0.0
    inductor_s: float = 0.0
    kernels: int = 0
    checks_s: float = 0.0

    def __str__(self) -> str:
        kernels = (f"{self.kernels} kernels" if self.kernels
                   else "no kernel generated (inductor's cache, or no inductor)")
        checks = f"inductor's per-process checks {self.checks_s:.2f} s more, " if self.checks_s >= 0.01 else ""
        return f"no dynamo, {checks}AOTAutograd {self.aot_s:.2f} s, inductor {self.inductor_s:.2f} s, {kernels}"


class CompileTimer:
    """Reads inductor's timer and kernel counter before a first call; `split()` after it gives that call's share."""

    def __init__(self):
        self._length = len(compilation_time_metrics.get(INDUCTOR, ()))
        self._kernels = inductor_metrics.generated_kernel_count

    def split(self, compile_s: float, checks_s: float = 0.0) -> CompileSplit:
        inductor = float(sum(compilation_time_metrics.get(INDUCTOR, [])[self._length:]))
        return CompileSplit(aot_s=max(compile_s - inductor, 0.0), inductor_s=inductor,
                            kernels=inductor_metrics.generated_kernel_count - self._kernels, checks_s=checks_s)
