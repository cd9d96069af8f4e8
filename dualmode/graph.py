"""Graph mode: trace the whole training step into one GraphModule and compile it with torch.compile.

How: `make_fx` runs `build()` once on fake tensors with every parameter, buffer, optimizer state tensor and
hyperparameter swapped in as a graph input. Autograd runs for real during that trace, so `loss.backward()`
inside `build()` is recorded op by op, tied weights included (one Parameter is one input, whatever its names).
The update rule of `updates.py` is then traced on the gradients, and its results are written back into the
inputs (`copy_`), which torch.compile turns into in-place updates. The result is one graph, compiled with
`torch.compile(fullgraph=True)`: a graph break would raise, never split the step silently.

What is baked into the graph: each group's `lr_scale`, the optimizer's switches (nesterov, amsgrad, ...),
shapes and dtypes, which parameters are trainable, train/eval mode, and the config. What stays a runtime
input: each group's lr and its other numeric hyperparameters, so schedulers never recompile. The baked parts
form the cache key; a change compiles a new graph, with a warning that names what changed.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from dualmode import updates
from dualmode.outputs import loss_of


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


@dataclass
class _Compiled:
    gm: torch.fx.GraphModule
    fn: object
    slots: list
    out_spec: object
    out_consts: list
    record: CompileRecord


@dataclass
class Explanation:
    """What graph mode compiled, as `TrainGraph.explain()` reports it. `print()` it for a summary."""

    mode: str
    compiles: list[CompileRecord] = field(default_factory=list)
    graphs: int = 0

    @property
    def recompiles(self) -> list[str]:
        return [r.reason for r in self.compiles if r.reason != "first call"]

    def __str__(self) -> str:
        lines = [f"mode: {self.mode}",
                 f"compiled graphs: {self.graphs} (one per cached variant of the step)",
                 "graph breaks: 0 (each graph is compiled with fullgraph=True, so a break would raise)",
                 f"compiles: {len(self.compiles)}, recompiles: {len(self.recompiles)}"]
        for i, r in enumerate(self.compiles):
            lines.append(f"  {i + 1}. [{r.phase}] {r.reason}: {r.nodes} ops, {r.inputs} inputs, "
                         f"trace {r.trace_s:.2f} s, first call (compile + run) {r.first_call_s:.2f} s")
        return "\n".join(lines)


class _Tensors:
    """The parameters and buffers of the step's modules, each tensor once, with its first qualified name."""

    def __init__(self, modules: list[tuple[str, torch.nn.Module]]):
        self.tensors: list[torch.Tensor] = []
        self.names: list[str] = []
        self.is_param: list[bool] = []
        self.index: dict[int, int] = {}
        self.modules = [module for _, module in modules]
        for attr, module in modules:
            named = [(n, t, True) for n, t in module.named_parameters()]
            named += [(n, t, False) for n, t in module.named_buffers()]
            for name, t, is_param in named:
                if id(t) not in self.index:
                    self.index[id(t)] = len(self.tensors)
                    self.tensors.append(t)
                    self.names.append(f"{attr}.{name}")
                    self.is_param.append(is_param)

    def signature(self) -> tuple:
        return tuple((n, tuple(t.shape), t.dtype, t.device, t.requires_grad)
                     for n, t in zip(self.names, self.tensors))


def _leaf_desc(v) -> tuple:
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), tuple(v.stride()), v.dtype, v.device)
    return ("const", repr(v))


def _describe_change(name: str, old, new) -> str:
    """A short sentence naming what changed between two compiled variants."""
    if name == "lr_scale":
        diffs = [f"group {i}: {a} -> {b}" for i, (a, b) in enumerate(zip(old, new)) if a != b]
        return "lr_scale changed (" + ", ".join(diffs or [f"{len(old)} -> {len(new)} groups"]) + ")"
    if name == "inputs":
        (old_spec, old_leaves), (new_spec, new_leaves) = old, new
        if old_spec != new_spec or len(old_leaves) != len(new_leaves):
            return "the structure of the inputs changed"
        for i, (a, b) in enumerate(zip(old_leaves, new_leaves)):
            if a != b:
                if a[0] == b[0] == "tensor" and a[1] != b[1]:
                    return f"new input shape: input {i} {a[1]} -> {b[1]}"
                return f"input {i} changed: {a[1:]} -> {b[1:]}"
    if name == "tensors":
        old_d = {o[0]: o for o in old}
        for n in new:
            o = old_d.get(n[0])
            if o is None:
                return f"new parameter or buffer {n[0]!r}"
            if o[4] != n[4]:
                return f"requires_grad of {n[0]!r} changed: {o[4]} -> {n[4]}"
            if o != n:
                return f"shape, dtype or device of {n[0]!r} changed"
        return "parameters or buffers were removed"
    if name == "groups":
        if len(old) != len(new):
            return f"param groups changed: {len(old)} -> {len(new)} groups (add_param_group?)"
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return f"param group {i} changed (its parameters or its switches: {a[2]} -> {b[2]})"
    if name == "training":
        return "train/eval mode of a module changed"
    return f"{name} changed: {old} -> {new}"


class GraphRunner:
    """The compiled variants of one TrainGraph's step, and the bookkeeping of its compiles."""

    def __init__(self):
        self._cache: dict[tuple, _Compiled] = {}
        self._last_parts: dict[str, dict] = {}
        self.records: list[CompileRecord] = []
        self.graph_module: torch.fx.GraphModule | None = None
        self._scalars: dict[tuple, torch.Tensor] = {}

    @property
    def compile_count(self) -> int:
        return len(self.records)

    # The call -------------------------------------------------------------------------------------------------

    def run(self, owner, phase: str, args: tuple, kwargs: dict):
        """Run one call of the step in graph mode; return build()'s outputs (detached)."""
        modules = owner._modules_of_step()
        tensors = _Tensors(modules)
        optimizer = owner.optimizer
        rule = None
        if optimizer is not None:
            rule = updates.rule_for(optimizer)
            if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
                raise TypeError(f"graph mode does not call {type(optimizer).__name__}'s step hooks, and this "
                                "optimizer has some: run the step with mode='eager' or remove the hooks")
        leaves, in_spec = tree_flatten((args, kwargs))
        parts = self._key_parts(owner, phase, tensors, optimizer, rule, leaves, in_spec)
        key = tuple(parts.items())
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self._compile(owner, phase, parts, tensors, optimizer, rule, leaves, in_spec)
            self._cache[key] = compiled
        inputs = [self._fetch(slot, tensors, optimizer, rule, leaves) for slot in compiled.slots]
        start = time.perf_counter()
        with torch.no_grad():
            outs = compiled.fn(*inputs)
        if not compiled.record.first_call_s:
            compiled.record.first_call_s = time.perf_counter() - start
        out_leaves = list(outs) + compiled.out_consts
        return tree_unflatten(out_leaves, compiled.out_spec)

    def _key_parts(self, owner, phase, tensors, optimizer, rule, leaves, in_spec) -> dict:
        config = owner.config
        parts = {
            "phase": phase,
            "inputs": (str(in_spec), tuple(_leaf_desc(v) for v in leaves)),
            "tensors": tensors.signature(),
            "training": tuple(m.training for _, mod in owner._modules_of_step() for m in mod.modules()),
            "config": (config.autocast_dtype, config.clip_grad_max_norm, config.clip_grad_norm_type,
                       config.check_finite, repr(sorted(config.compile_options.items()))),
        }
        if optimizer is not None:
            parts["groups"] = tuple(
                (type(optimizer).__name__,
                 tuple(tensors.index.get(id(p), -1) for p in g["params"]),
                 rule.flags(g),
                 (g.get("clip_grad_max_norm"), g.get("clip_grad_norm_type", 2.0)))
                for g in optimizer.param_groups)
            parts["lr_scale"] = tuple(float(g.get("lr_scale", 1.0)) for g in optimizer.param_groups)
        return parts

    # Compiling ------------------------------------------------------------------------------------------------

    def _compile(self, owner, phase, parts, tensors, optimizer, rule, leaves, in_spec) -> _Compiled:
        reason = self._reason(phase, parts)
        recompiles = sum(r.reason != "first call" for r in self.records)
        if reason != "first call":
            if recompiles >= owner.config.max_recompiles:
                raise RecompileLimitError(
                    f"{type(owner).__name__}: graph mode must recompile because {reason}, but the "
                    f"{recompiles} recompiles allowed by config.max_recompiles={owner.config.max_recompiles} are "
                    "used up. Keep shapes fixed (drop_last=True or pad the last batch), set lr_scale before the "
                    "first call, or raise config.max_recompiles.")
            warnings.warn(f"{type(owner).__name__}: graph mode recompiles the step because {reason} "
                          f"(recompile {recompiles + 1} of at most {owner.config.max_recompiles})",
                          RecompileWarning, stacklevel=4)
        self._last_parts[phase] = parts
        slots = self._slots(tensors, optimizer, rule, leaves, phase)
        examples = [self._example(slot, tensors, optimizer, rule, leaves) for slot in slots]
        tracer = _StepTracer(owner, phase, tensors, optimizer, rule, leaves, in_spec, slots)
        start = time.perf_counter()
        gm = make_fx(tracer, tracing_mode="fake", _allow_non_fake_inputs=True)(*examples)
        used = _prune_unused_inputs(gm)
        trace_s = time.perf_counter() - start
        opts = {k: v for k, v in owner.config.compile_options.items() if v is not None}
        fn = torch.compile(gm, fullgraph=True, **opts)
        record = CompileRecord(phase, reason, trace_s,
                               nodes=sum(n.op == "call_function" for n in gm.graph.nodes), inputs=len(used))
        self.records.append(record)
        self.graph_module = gm
        return _Compiled(gm, fn, [slots[i] for i in used], tracer.out_spec, tracer.out_consts, record)

    def _reason(self, phase: str, parts: dict) -> str:
        last = self._last_parts.get(phase)
        if last is None:
            return "first call"
        for name, value in parts.items():
            if last.get(name) != value:
                return _describe_change(name, last.get(name), value)
        return "unknown change"

    @staticmethod
    def _slots(tensors, optimizer, rule, leaves, phase) -> list[tuple]:
        """The inputs of the traced step, in order; each slot says where its tensor comes from."""
        slots = [("tensor", i) for i in range(len(tensors.tensors))]
        slots += [("arg", k) for k, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        if optimizer is None:
            return slots
        for gi, group in enumerate(optimizer.param_groups):
            slots.append(("hyper", gi, "lr"))
            slots += [("hyper", gi, name) for name in rule.hyper]
            flags = rule.flags(group)
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                ti = tensors.index[id(p)]
                if rule.lazy:
                    slots.append(("has_buffer", gi, ti))
                slots += [("state", gi, ti, k) for k in rule.state(flags, p, group)]
                if phase in ("accumulate", "apply"):
                    slots.append(("grad", gi, ti))
        return slots

    def _example(self, slot, tensors, optimizer, rule, leaves) -> torch.Tensor:
        kind = slot[0]
        if kind == "state":
            _, gi, ti, key = slot
            p, group = tensors.tensors[ti], optimizer.param_groups[gi]
            existing = optimizer.state.get(p, {}).get(key)
            return existing if existing is not None else rule.state(rule.flags(group), p, group)[key]
        if kind == "grad":
            p = tensors.tensors[slot[2]]
            return p.grad if p.grad is not None else torch.zeros_like(p)
        return self._fetch(slot, tensors, optimizer, rule, leaves)

    def _fetch(self, slot, tensors, optimizer, rule, leaves) -> torch.Tensor:
        """The real tensor for one input slot at call time; creates optimizer state the way torch.optim would."""
        kind = slot[0]
        if kind == "tensor":
            t = tensors.tensors[slot[1]]
            return t.detach() if tensors.is_param[slot[1]] else t
        if kind == "arg":
            return leaves[slot[1]]
        if kind == "hyper":
            _, gi, name = slot
            group = optimizer.param_groups[gi]
            value = float(group["lr"]) if name == "lr" else updates.hyper_values(rule, group)[name]
            return self._scalar((gi, name), torch.float64).fill_(value)
        if kind == "has_buffer":
            p = tensors.tensors[slot[2]]
            has = optimizer.state.get(p, {}).get(rule.lazy) is not None
            return self._scalar(("has_buffer", slot[2]), torch.bool).fill_(has)
        if kind == "state":
            _, gi, ti, key = slot
            p, group = tensors.tensors[ti], optimizer.param_groups[gi]
            state = optimizer.state[p]
            if state.get(key) is None:
                state[key] = rule.state(rule.flags(group), p, group)[key]
            return state[key]
        if kind == "grad":
            p = tensors.tensors[slot[2]]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            return p.grad
        raise AssertionError(f"unknown slot {slot}")

    def _scalar(self, key, dtype) -> torch.Tensor:
        # One persistent 0-d tensor per runtime scalar, refilled at each call.
        t = self._scalars.get(key)
        if t is None:
            t = self._scalars[key] = torch.zeros((), dtype=dtype)
        return t


def _prune_unused_inputs(gm: torch.fx.GraphModule) -> list[int]:
    """Drop dead code and the inputs nothing reads (state of parameters that got no gradient); return kept indices."""
    gm.graph.eliminate_dead_code()
    used = []
    for i, node in enumerate([n for n in gm.graph.nodes if n.op == "placeholder"]):
        if node.users:
            used.append(i)
        else:
            gm.graph.erase_node(node)
    gm.recompile()
    return used


class _StepTracer:
    """The function make_fx traces: forward, backward and update, over the step's input slots."""

    def __init__(self, owner, phase, tensors, optimizer, rule, leaves, in_spec, slots):
        self.owner, self.phase, self.tensors = owner, phase, tensors
        self.optimizer, self.rule, self.leaves, self.in_spec, self.slots = optimizer, rule, leaves, in_spec, slots
        self.out_spec = None
        self.out_consts: list = []

    def __call__(self, *flat):
        values = dict(zip(self.slots, flat))
        tensors = [values[("tensor", i)] for i in range(len(self.tensors.tensors))]
        leaves = [values.get(("arg", k), v) for k, v in enumerate(self.leaves)]
        args, kwargs = tree_unflatten(leaves, self.in_spec)
        train = self.optimizer is not None
        if train:
            for i, t in enumerate(self.tensors.tensors):
                if self.tensors.is_param[i] and t.requires_grad:
                    tensors[i].requires_grad_(True)
        stand_ins = {id(t): tensors[i] for i, t in enumerate(self.tensors.tensors)}
        with _swapped(self.tensors.modules, stand_ins), (torch.enable_grad() if train else torch.no_grad()):
            out = self.owner._run_build(args, kwargs)
        if train:
            self._update(values, tensors, out)
        out_leaves, self.out_spec = tree_flatten(out)
        tensor_outs = [v.detach() for v in out_leaves if isinstance(v, torch.Tensor)]
        if len(tensor_outs) != len(out_leaves) and any(isinstance(v, torch.Tensor) for v in out_leaves):
            raise TypeError("graph mode: build() must return tensors only, or values that are not tensors only")
        if len(tensor_outs) != len(out_leaves):
            self.out_consts = out_leaves
            return ()
        return tuple(tensor_outs)

    def _update(self, values, tensors, out):
        optimizer, rule, config = self.optimizer, self.rule, self.owner.config
        owner_name = type(self.owner).__name__
        members = []  # (group index, tensor index) of each parameter that got a gradient
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                ti = self.tensors.index.get(id(p))
                if p.requires_grad and tensors[ti].grad is not None:
                    members.append((gi, ti))
        if not members:
            raise RuntimeError(f"{owner_name}.build() left no gradient on any parameter of the optimizer: "
                               "call loss.backward() inside build()")
        loss = loss_of(out)
        ok = torch.isfinite(loss.detach()).all() if (config.check_finite and loss is not None) else None
        with torch.no_grad():
            grads = {ti: tensors[ti].grad for _, ti in members}
            if self.phase == "accumulate":
                for gi, ti in members:
                    buffer = values[("grad", gi, ti)]
                    _write(buffer, buffer + grads[ti], ok)
                return
            if self.phase == "apply":
                grads = {ti: values[("grad", gi, ti)] + grads[ti] for gi, ti in members}
            grads = self._clipped(grads, members)
            for gi, ti in members:
                group = optimizer.param_groups[gi]
                flags = rule.flags(group)
                p = tensors[ti]
                state = {k: values[("state", gi, ti, k)] for k in rule.state(flags, self.tensors.tensors[ti], group)}
                if rule.lazy:
                    state["has_buffer"] = values[("has_buffer", gi, ti)]
                hyper = {name: values[("hyper", gi, name)] for name in rule.hyper}
                lr = values[("hyper", gi, "lr")] * float(group.get("lr_scale", 1.0))
                new_p, new_state = rule.update(p, grads[ti], state, hyper, lr, flags)
                _write(p, new_p, ok)
                for k, v in new_state.items():
                    _write(state[k], v, ok)

    def _clipped(self, grads: dict, members: list) -> dict:
        """Clip per group where the group has clip_grad_max_norm, and the rest together by the config."""
        config, groups = self.owner.config, self.optimizer.param_groups
        by_clip: dict[tuple, list[int]] = {}
        for gi, ti in members:
            g = groups[gi]
            if g.get("clip_grad_max_norm") is not None:
                key = ("group", gi, g["clip_grad_max_norm"], g.get("clip_grad_norm_type", 2.0))
            elif config.clip_grad_max_norm is not None:
                key = ("config", -1, config.clip_grad_max_norm, config.clip_grad_norm_type)
            else:
                continue
            by_clip.setdefault(key, []).append(ti)
        grads = dict(grads)
        for (_, _, max_norm, norm_type), tis in by_clip.items():
            clipped = updates.clip_grads([grads[ti] for ti in tis], float(max_norm), float(norm_type))
            grads.update(zip(tis, clipped))
        return grads


@contextlib.contextmanager
def _swapped(modules: list[torch.nn.Module], stand_ins: dict[int, torch.Tensor]):
    """Put the traced stand-ins in place of the modules' parameters and buffers, then put the originals back.

    Each storage slot (a module's own `_parameters` or `_buffers` entry) is swapped once, so a module reached
    under two names and a Parameter tied into two modules both come back exactly as they were.
    """
    slots, seen = [], set()
    for module in modules:
        for sub in module.modules():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            for store in (sub._parameters, sub._buffers):
                slots += [(store, name, t) for name, t in store.items() if t is not None and id(t) in stand_ins]
    try:
        for store, name, t in slots:
            store[name] = stand_ins[id(t)]
        yield
    finally:
        for store, name, t in slots:
            store[name] = t


def _write(dst: torch.Tensor, new: torch.Tensor, ok) -> None:
    """Write a new value into an input; with the finite check on, keep the old value when the loss is not finite."""
    if ok is not None:
        new = torch.where(ok, new, dst)
    dst.copy_(new)
