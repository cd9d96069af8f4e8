"""The call that compiles: the settings it runs under and where its time goes.

Settings: inductor's recompute pass (remat.py), and dynamo's `specialize_float`. Every runtime scalar of a
traced step is a 0-d tensor input, so each Python float the GraphModule holds is a baked constant; left
unspecialized, dynamo first turns such floats into symbols, fails to turn them into tensors and restarts its
whole analysis (`TensorifyScalarRestartAnalysis`), which traced and compiled the step's graph twice up to
AOTAutograd (2.3 s of a 25 s first call for the test MLP, more for larger graphs).

Where the time goes: the compile timers that dynamo and inductor keep (`torch._dynamo.utils.
compilation_time_metrics`, one list of seconds per timed function, for the whole process) and inductor's kernel
counter, read before and after the call: dynamo = its frame compile minus the backend, AOTAutograd = the backend
minus inductor's `compile_fx_inner`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch._dynamo import config as dynamo_config
from torch._dynamo.utils import compilation_time_metrics
from torch._inductor import metrics as inductor_metrics

from dualmode.graph.remat import RecomputePass, installed

DYNAMO, BACKEND, INDUCTOR = "_compile.compile_inner", "OutputGraph.call_user_compiler", "compile_fx_inner"


def compile_step(gm: torch.fx.GraphModule, options: dict):
    """The compiled step: torch.compile of the traced graph, whole (a graph break raises).

    gm.forward, not gm: fx's call wrapper formats a runtime error (a lost peer, a bad index) with a generator,
    which dynamo then fails to compile, hiding the real error behind "Attempt to trace generator".
    """
    return torch.compile(gm.forward, fullgraph=True, **options)


@contextlib.contextmanager
def compiling(recompute: RecomputePass | None):
    """The settings of the call that compiles (dynamo compiles on that call, not in compile_step)."""
    with installed(recompute), dynamo_config.patch(specialize_float=True):
        yield


@dataclass
class CompileSplit:
    """The seconds of one first call spent in dynamo, AOTAutograd and inductor, and the kernels generated."""

    dynamo_s: float = 0.0
    aot_s: float = 0.0
    inductor_s: float = 0.0
    kernels: int = 0

    def __str__(self) -> str:
        kernels = (f"{self.kernels} kernels" if self.kernels
                   else "no kernel generated (inductor's cache, or no inductor)")
        return (f"dynamo {self.dynamo_s:.2f} s, AOTAutograd {self.aot_s:.2f} s, inductor {self.inductor_s:.2f} s, "
                f"{kernels}")


class CompileTimer:
    """Reads the compile timers before a call; `split()` after it gives that call's share."""

    def __init__(self):
        self._lengths = {k: len(compilation_time_metrics.get(k, ())) for k in (DYNAMO, BACKEND, INDUCTOR)}
        self._kernels = inductor_metrics.generated_kernel_count

    def _since(self, key: str) -> float:
        return float(sum(compilation_time_metrics.get(key, [])[self._lengths[key]:]))

    def split(self) -> CompileSplit:
        dynamo, backend, inductor = self._since(DYNAMO), self._since(BACKEND), self._since(INDUCTOR)
        return CompileSplit(dynamo_s=max(dynamo - backend, 0.0), aot_s=max(backend - inductor, 0.0),
                            inductor_s=inductor, kernels=inductor_metrics.generated_kernel_count - self._kernels)
