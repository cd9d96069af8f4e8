"""Graph mode: trace the whole training step into one GraphModule and compile it with a torch.compile backend.

How (trace.py): `make_fx` runs `build()` once on fake tensors with every parameter, buffer, optimizer state and
hyperparameter swapped in as a graph input. Autograd runs for real during that trace, so `loss.backward()`
inside `build()` is recorded op by op, tied weights included (one Parameter is one input, whatever its names).
The update rule of `updates.py` is then traced on the gradients, and its results are written back into the
inputs (`copy_`), which AOTAutograd turns into in-place updates. The result is one graph, handed whole to the
backend (inductor by default; compile.py), without dynamo: nothing can split it.

What is baked into the graph: each group's `lr_scale`, the optimizer's switches (nesterov, amsgrad, ...),
shapes and dtypes, which parameters are trainable, train/eval mode, and the config. What stays a runtime
input: each group's lr and its other numeric hyperparameters, so schedulers never recompile. The baked parts
form the cache key; a change compiles a new graph, with a warning that names what changed. A call like the
last one of its phase is recognised without rebuilding the key (fastpath.py).

With inductor, the compile runs `remat.RecomputePass` as a post-grad pass: it recomputes cheap activations in
the backward, as AOTAutograd's partitioner does for `torch.compile(model)` (see remat.py).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_unflatten

from dualmode.graph import collectives, diagnose, guards, refusals
from dualmode.graph.batch import BatchDims, BatchGuard, fake_examples
from dualmode.graph.changes import describe_change
from dualmode.graph.compile import CompileTimer, compile_step, compiling
from dualmode.graph.fastpath import LastCall
from dualmode.graph.fetch import FetchPlan
from dualmode.graph.inputs import StepCall
from dualmode.graph.progress import CompileProgress
from dualmode.graph.randomness import eager_random
from dualmode.graph.remat import RecomputePass
from dualmode.graph.report import FIRST, CompileRecord, RecompileLimitError, RecompileWarning
from dualmode.graph.saved_trace import Traced, TraceStore
from dualmode.graph.step_buffers import RunnerBuffers
from dualmode.graph.trace import StepTracer, trace_step
from dualmode.graph.warm_up import BackendWarmUp
from dualmode.step import finite
from dualmode.step.outputs import loss_of
from dualmode.step.view import OWN_ATTRIBUTES, StepView


@dataclass
class _Compiled:
    fn: object
    gm: torch.fx.GraphModule
    slots: list
    tracer: StepTracer  # out_spec, out_consts, and what the outputs after build()'s own are
    guard: guards.Guard  # what build() read from Python when traced
    record: CompileRecord
    recompute_pass: RecomputePass | None = None
    batch_guard: BatchGuard | None = None  # None: the batch size is a constant of this variant
    fetch: FetchPlan | None = None
    cpu: bool = False  # every tensor input on the CPU: the step's buffers can come from its pool (step_buffers.py)


class GraphRunner:
    """The compiled variants of one TrainGraph's step, and the bookkeeping of its compiles."""

    def __init__(self):
        self._cache: dict[tuple, list[_Compiled]] = {}  # per cache key, variants told apart by their guards
        self._last_parts: dict[str, dict] = {}
        self._scalars: dict[tuple, torch.Tensor] = {}
        self._fixed_batch: set[tuple] = set()  # symbolic-batch keys whose trace turned the batch into a constant
        self._last_call: dict[str, LastCall] = {}  # per phase: the call the next one is compared with
        self.records: list[CompileRecord] = []
        self.graph_module: torch.fx.GraphModule | None = None
        self.buffers = RunnerBuffers()  # where a CPU step's buffers come from

    @property
    def compile_count(self) -> int:
        return len(self.records)

    @property
    def graphs(self) -> int:
        return sum(len(variants) for variants in self._cache.values())

    def run(self, step: StepView, phase: str, args: tuple, kwargs: dict):
        """Run one call of the step in graph mode; return build()'s outputs (detached)."""
        last = self._last_call.get(phase)
        call = last.reuse(step, phase, args, kwargs) if last is not None else None
        if call is not None and last.compiled.guard.change() is None:
            refusals.check_hooks(call.tensors.names, call.tensors.tensors, call.tensors.is_param)
            return self._run(call, last.compiled)
        call = StepCall(step, phase, args, kwargs)
        refusals.check_hooks(call.tensors.names, call.tensors.tensors, call.tensors.is_param)
        key, parts, variants, batch = self._lookup(call.key_parts(), BatchDims(call.leaves, step.config.dynamic_batch))
        compiled = next((c for c in variants if c.guard.change() is None), None)  # as dynamo's cache entries
        new = compiled is None
        if new:
            compiled = self._compile(call, parts, batch, variants[-1].guard.change() if variants else None)
            if batch and compiled.batch_guard is None:  # the trace fixed the batch size: key on the sizes
                self._fixed_batch.add(key)
                key, parts, _, batch = self._lookup(call.key_parts(), BatchDims([], False))
        if not new:
            out = self._run(call, compiled)
            self._last_call[phase] = LastCall(call, compiled, args, kwargs)
            return out
        inputs = compiled.fetch.inputs(call, self._scalars)
        try:
            outs = self._first_call(compiled, inputs, step.name, self.buffers.for_call(compiled.cpu, step.config))
        except Exception as error:
            call.undo_created()  # nothing of a failed variant is cached or counted
            raise diagnose.first_run_error(step.name, error, call.leaves, call.tensors.tensors) from error
        self._register(key, parts, compiled)
        self._last_call[phase] = LastCall(call, compiled, args, kwargs)
        return self._results(call, compiled, list(outs))

    def _run(self, call: StepCall, compiled: _Compiled):
        """A call of a variant that has run before."""
        inputs = compiled.fetch.inputs(call, self._scalars)
        misfit = compiled.fetch.misfit(inputs)
        if misfit is not None:
            call.undo_created()
            raise diagnose.layout_error(call, compiled, misfit, inputs[misfit])
        grad_was = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad() as a context manager costs about 2 us per call
        try:
            with self.buffers.for_call(compiled.cpu, call.step.config):
                outs = compiled.fn(*inputs)
        except Exception:
            call.undo_created()
            raise
        finally:
            torch._C._set_grad_enabled(grad_was)
        return self._results(call, compiled, list(outs))

    def _results(self, call: StepCall, compiled: _Compiled, outs: list):
        """build()'s outputs; hands input gradients back, and refuses a call whose check_finite flags failed."""
        tracer = compiled.tracer
        n, grads = tracer.user_outputs, tracer.input_grads
        out = outs[0] if tracer.out_spec.is_leaf() and n == 1 else tree_unflatten(outs[:n] + tracer.out_consts,
                                                                                 tracer.out_spec)
        if tracer.finite_names is not None and not bool(outs[-1].all()):
            call.undo_created()
            named = finite.culprits(outs[-1], loss_of(out), tracer.finite_names)
            raise finite.refusal(call.step.name, getattr(call.step.owner, "step_count", 0), named,
                                 "the compiled step kept parameters, optimizer state and gradients unchanged")
        for k, grad in zip(grads, outs[n:n + len(grads)]):
            leaf = call.leaves[k]
            if leaf.grad is None:
                leaf.grad = grad
            else:
                with torch.no_grad():
                    leaf.grad.add_(grad)  # accumulates, as autograd does for a leaf
        return out

    def _lookup(self, parts: dict, batch: BatchDims):
        """(key, key parts, compiled variants, batch dims) of a call: the symbolic-batch variant when
        there is one whose trace left the batch size free and whose conditions on it hold, else the concrete one."""
        if batch:
            general = batch.general(parts)
            key = tuple(general.items())
            variants = self._cache.get(key, [])
            if key not in self._fixed_batch and all(c.batch_guard.holds(batch) for c in variants):
                return key, general, variants, batch
        key = tuple(parts.items())
        return key, parts, self._cache.get(key, []), BatchDims([], False)

    @staticmethod
    def _first_call(compiled: _Compiled, inputs: list, name: str, buffers):
        """The call that compiles: logged while it runs (progress.py), timed by compiler stage (compile.py)."""
        record, recompute = compiled.record, compiled.recompute_pass
        start = time.perf_counter()
        timer = CompileTimer()
        what = f"{name} ({record.phase}, {record.nodes} ops, {record.inputs} inputs)"
        with CompileProgress(what) as progress, compiling(recompute), eager_random(), torch.no_grad(), buffers:
            outs = compiled.fn(*inputs)
            record.split = timer.split(compiled.fn.compile_s, compiled.fn.wait_s)
            loaded = record.trace_source.startswith("loaded")
            progress.summary = f"{'loaded trace' if loaded else 'trace'} {record.trace_s:.2f} s, {record.split}"
        record.first_call_s = time.perf_counter() - start
        if recompute is not None:
            # The pass does not run when inductor's FX graph cache supplies the compiled graph.
            runs = recompute.rewritten
            record.recompute = (f"{sum(runs)} activations (inductor post-grad pass)" if runs else
                                "as compiled before (graph loaded from inductor's cache)")
        return outs

    def _compile(self, call: StepCall, parts: dict, batch: BatchDims, guard_change: str | None) -> _Compiled:
        name, config = call.step.name, call.step.config
        reason = guard_change or self._reason(call.phase, parts)
        recompiles = sum(r.reason != FIRST for r in self.records)
        if reason != FIRST:
            if recompiles >= config.max_recompiles:
                raise RecompileLimitError(
                    f"{name}: graph mode must recompile because {reason}, but the "
                    f"{recompiles} recompiles allowed by config.max_recompiles={config.max_recompiles} are "
                    "used up. Keep shapes fixed (drop_last=True or pad the last batch), set lr_scale before the "
                    "first call, or raise config.max_recompiles.")
            warnings.warn(f"{name}: graph mode recompiles the step because {reason} "
                          f"(recompile {recompiles + 1} of at most {config.max_recompiles})",
                          RecompileWarning, stacklevel=4)
        slots = call.slots()
        examples = [call.example(slot, self._scalars) for slot in slots]
        options = {k: v for k, v in config.compile_options.items() if v is not None}
        warm_up = BackendWarmUp.start(options, examples)
        start = time.perf_counter()
        traced = self._traced(call, parts, slots, examples, batch)
        gm, used, tracer, batch_guard = traced.gm, traced.used, traced.tracer, traced.batch_guard
        trace_s = time.perf_counter() - start
        guard = guards.Guard.from_reads(tracer.reads, tracer.labels, OWN_ATTRIBUTES)
        fixed = batch_guard.fixed
        if fixed or not batch:
            batch_guard = None
        fn = compile_step(gm, options, warm_up)
        record = CompileRecord(call.phase, reason, trace_s, inputs=len(used), trace_source=traced.source,
                               nodes=sum(n.op == "call_function" for n in gm.graph.nodes),
                               collectives=collectives.summary(gm, tracer.reducer))
        if call.plan is not None:
            record.updates = [call.plan.describe(i, g) for i, g in enumerate(call.groups)]
        recompute = None
        if not config.recompute_activations:
            record.recompute = "off (config.recompute_activations=False)"
        elif options.get("backend", "inductor") != "inductor":
            record.recompute = f"off (backend {options['backend']!r}: the pass runs in inductor)"
        else:
            recompute = RecomputePass()
        if batch:
            record.batch = (f"fixed by build() (input {fixed[0]}'s first size is used as a number)" if fixed
                            else "symbolic (" + ", ".join(f"input {i}" for i in batch.labels) + ")")
        fetch = FetchPlan([slots[i] for i in used])
        fetch.traced_layouts([examples[i] for i in used])
        cpu = all(e.device.type == "cpu" for e in examples if isinstance(e, torch.Tensor))
        return _Compiled(fn, gm, fetch.slots, tracer, guard, record, recompute, batch_guard, fetch, cpu)

    @staticmethod
    def _traced(call: StepCall, parts: dict, slots: list, examples: list, batch: BatchDims) -> Traced:
        """The traced step: loaded from a saved trace where config.trace_cache allows and it matches, else
        traced; with config.trace_cache, saved and loaded back at once, as the next process will load it."""
        fakes, batch_guard = fake_examples(slots, examples, batch)
        store = TraceStore.for_config(call.step.config)
        if store is None:
            return Traced(*trace_step(call, slots, fakes), batch_guard)
        loaded, unused = store.load(call, parts, slots, fakes)
        if loaded is not None:
            return loaded
        traced = Traced(*trace_step(call, slots, fakes), batch_guard)
        why = store.save(call, parts, traced)
        saved = "not saved: " + why if why is not None else f"saved for later processes ({store.directory})"
        if why is None:
            loaded, why = store.load(call, parts, slots, fake_examples(slots, examples, batch)[0])
            if loaded is None:  # a description that differs within one process: a bug in lasting.py
                saved = f"saved, but it does not load back ({why})"
        traced = loaded or traced
        traced.source = (f"traced ({unused}); " if unused else "traced; ") + saved
        return traced

    def _register(self, key: tuple, parts: dict, compiled: _Compiled) -> None:
        """Cache and count a variant once its first run succeeded."""
        self._cache.setdefault(key, []).append(compiled)
        self.records.append(compiled.record)
        self._last_parts[compiled.record.phase] = parts
        self.graph_module = compiled.gm

    def _reason(self, phase: str, parts: dict) -> str:
        last = self._last_parts.get(phase)
        if last is None:
            return FIRST
        for name, value in parts.items():
            if last.get(name) != value:
                return describe_change(name, last.get(name), value)
        return "unknown change"
