"""What graph mode reports: compile records, `TrainGraph.explain()`, and its warnings and errors.

Kept apart from the runner so that `import dualmode` (and eager mode) never loads dynamo or inductor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FIRST = "first call"


class TraceError(RuntimeError):
    """build() could not be traced in graph mode.

    Raised by the first graph-mode call of a `TrainGraph` whose `build()` needs the Python value of a tensor
    (`.item()`, an `if` on a tensor): such a step cannot be one graph. The message names the step and the
    cause; the step is left unchanged, and `mode="eager"` runs it.

    Example:
        >>> import torch, dualmode as dm
        >>> class Step(dm.TrainGraph):
        ...     def __init__(self, model):
        ...         super().__init__(config=dm.StepConfig(compile_options={"backend": "aot_eager"}))
        ...         self.model = model
        ...         self.add_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        ...     def build(self, x):
        ...         loss = self.model(x).square().mean()
        ...         if loss > 100:                     # a Python branch on a tensor's value
        ...             loss = loss / 100
        ...         loss.backward()
        ...         return loss
        >>> step = Step(torch.nn.Linear(4, 1))
        >>> step(torch.randn(8, 4))
        Traceback (most recent call last):
            ...
        dualmode.graph.report.TraceError: Step.build() needs the Python value of a tensor ... mode='eager'. ...
        >>> step.mode = "eager"
        >>> loss = step(torch.randn(8, 4))
    """


class RecompileWarning(UserWarning):
    """Graph mode compiled the step again; the message names what changed.

    Warned by a graph-mode call that finds no compiled variant for what it is given (a new input shape, a
    changed `lr_scale`, a new param group, ...): it compiles one more, keeps the earlier ones, and says why.
    `TrainGraph.explain()` lists the same reasons.

    Example:
        >>> import torch, dualmode as dm
        >>> class Step(dm.TrainGraph):
        ...     def __init__(self, model, **config):
        ...         super().__init__(config=dm.StepConfig(compile_options={"backend": "aot_eager"}, **config))
        ...         self.model = model
        ...         self.add_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        ...     def build(self, x):
        ...         loss = self.model(x).square().mean()
        ...         loss.backward()
        ...         return loss
        >>> import warnings
        >>> step = Step(torch.nn.Linear(4, 1))
        >>> loss = step(torch.randn(8, 4))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     step.optimizer.param_groups[0]["lr_scale"] = 2.0   # a baked constant
        ...     loss = step(torch.randn(5, 4))                       # (a new batch size alone compiles nothing)
        >>> print(caught[0].message)
        Step: graph mode recompiles the step because lr_scale changed (group 0: 1.0 -> 2.0) (recompile 1 of ...
    """


class RecompileLimitError(RuntimeError):
    """Graph mode recompiled more often than `config.max_recompiles` allows.

    Raised by the call that would compile once more, before anything changes: the parameters, the optimizer
    and the step count are as they were. The message names the reason and how to avoid it.

    Example:
        >>> import torch, dualmode as dm
        >>> class Step(dm.TrainGraph):
        ...     def __init__(self, model, **config):
        ...         super().__init__(config=dm.StepConfig(compile_options={"backend": "aot_eager"}, **config))
        ...         self.model = model
        ...         self.add_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        ...     def build(self, x):
        ...         loss = self.model(x).square().mean()
        ...         loss.backward()
        ...         return loss
        >>> step = Step(torch.nn.Linear(4, 1), max_recompiles=0)
        >>> loss = step(torch.randn(8, 4))
        >>> step.optimizer.param_groups[0]["lr_scale"] = 2.0
        >>> step(torch.randn(8, 4))
        Traceback (most recent call last):
            ...
        dualmode.graph.report.RecompileLimitError: Step: graph mode must recompile because lr_scale changed ...
        >>> step.step_count
        1
    """


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
    collectives: str = ""  # under DistributedDataParallel: the traced all-reduces and the gradient buckets
    updates: list[str] = field(default_factory=list)  # how each group's update was compiled (plans.py)
    batch: str = "static"  # how the batch dimension was traced (batch.py)
    split: object = None  # compile.CompileSplit of the first call: seconds of each stage, kernels
    trace_source: str = ""  # with config.trace_cache: loaded from a saved trace, saved, or why not (saved_trace.py)


@dataclass
class Explanation:
    """What graph mode compiled, as `TrainGraph.explain()` reports it. `print()` it for a summary.

    Attributes:
        mode: the step's mode when `explain()` was called, "graph" or "eager".
        compiles: one record per compile, in order: phase ("step", "accumulate", "apply" or "eval"), reason
            ("first call" or what changed), aten ops and inputs of the traced step, trace and first-call
            seconds, and what the recompute pass did.
        graphs: how many compiled variants of the step are kept.
        buffers: where a CPU step's buffers come from (its pool, and the MiB it keeps between calls, or malloc and
            why); None before a CPU step ran (step_buffers.py).

    Example:
        >>> import torch, dualmode as dm
        >>> class Step(dm.TrainGraph):
        ...     def __init__(self, model, **config):
        ...         super().__init__(config=dm.StepConfig(compile_options={"backend": "aot_eager"}, **config))
        ...         self.model = model
        ...         self.add_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        ...     def build(self, x):
        ...         loss = self.model(x).square().mean()
        ...         loss.backward()
        ...         return loss
        >>> step = Step(torch.nn.Linear(4, 1))
        >>> loss = step(torch.randn(8, 4))
        >>> print(step.explain())
        mode: graph
        compiled graphs: 1 (one per cached variant of the step)
        graph breaks: 0 (the traced graph goes to the backend whole, without dynamo: nothing can break it)
        compiles: 1, recompiles: 0
          1. [step] first call: ... ops, ... inputs, trace ... s, first call (compile + run) ... s; recomputed ...
        >>> step.explain().recompiles
        []
    """

    mode: str
    compiles: list[CompileRecord] = field(default_factory=list)
    graphs: int = 0
    buffers: str | None = None

    @property
    def recompiles(self) -> list[str]:
        """The reason of each compile after the first, in order (empty when nothing recompiled)."""
        return [r.reason for r in self.compiles if r.reason != FIRST]

    def __str__(self) -> str:
        lines = [f"mode: {self.mode}",
                 f"compiled graphs: {self.graphs} (one per cached variant of the step)",
                 "graph breaks: 0 (the traced graph goes to the backend whole, without dynamo: nothing can break it)",
                 f"compiles: {len(self.compiles)}, recompiles: {len(self.recompiles)}"]
        for i, r in enumerate(self.compiles):
            lines.append(f"  {i + 1}. [{r.phase}] {r.reason}: {r.nodes} ops, {r.inputs} inputs, "
                         f"trace {r.trace_s:.2f} s, first call (compile + run) {r.first_call_s:.2f} s; "
                         f"recomputed in the backward: {r.recompute}")
            if r.collectives:
                lines.append(f"     collectives in the graph: {r.collectives}")
            lines += [f"     update {u}" for u in r.updates]
            if r.split is not None:
                lines.append(f"     first call: trace {r.trace_s:.2f} s, {r.split}; batch dimension: {r.batch}")
            if r.trace_source:
                lines.append(f"     trace: {r.trace_source}")
        if self.buffers is not None:
            lines.append(f"step buffers: {self.buffers}")
        return "\n".join(lines)
