"""What graph mode reports: compile records, `TrainGraph.explain()`, and its warnings and errors.

Kept apart from the runner so that `import dualmode` (and eager mode) never loads dynamo or inductor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FIRST = "first call"


class TraceError(RuntimeError):
    """build() could not be traced in graph mode."""


class RecompileWarning(UserWarning):
    """Graph mode compiled the step again; the message names what changed."""


class RecompileLimitError(RuntimeError):
    """Graph mode recompiled more often than `config.max_recompiles` allows."""


@dataclass
class CompileRecord:
    """One compile of the step: why, and what it cost."""

    phase: str
    reason: str
    trace_s: float
    first_call_s: float = 0.0
    nodes: int = 0
    inputs: int = 0
    recompute: str = "off"
    batch: str = "static"  # how the batch dimension was traced (batch.py)
    split: object = None  # compile.CompileSplit of the first call: dynamo, AOTAutograd, inductor seconds, kernels


@dataclass
class Explanation:
    """What graph mode compiled, as `TrainGraph.explain()` reports it. `print()` it for a summary."""

    mode: str
    compiles: list[CompileRecord] = field(default_factory=list)
    graphs: int = 0

    @property
    def recompiles(self) -> list[str]:
        return [r.reason for r in self.compiles if r.reason != FIRST]

    def __str__(self) -> str:
        lines = [f"mode: {self.mode}",
                 f"compiled graphs: {self.graphs} (one per cached variant of the step)",
                 "graph breaks: 0 (each graph is compiled with fullgraph=True, so a break would raise)",
                 f"compiles: {len(self.compiles)}, recompiles: {len(self.recompiles)}"]
        for i, r in enumerate(self.compiles):
            lines.append(f"  {i + 1}. [{r.phase}] {r.reason}: {r.nodes} ops, {r.inputs} inputs, "
                         f"trace {r.trace_s:.2f} s, first call (compile + run) {r.first_call_s:.2f} s; "
                         f"recomputed in the backward: {r.recompute}")
            if r.split is not None:
                lines.append(f"     first call: trace {r.trace_s:.2f} s, {r.split}; batch dimension: {r.batch}")
        return "\n".join(lines)
