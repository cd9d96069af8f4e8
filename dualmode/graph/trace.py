"""Tracing one whole training step (forward, backward, update) into a torch.fx GraphModule with make_fx.

`make_fx` runs `build()` once on fake tensors that stand in for every input slot (inputs.py). Autograd runs
for real during that trace, so the `loss.backward()` inside `build()` is recorded op by op; a Parameter tied
into two modules is one stand-in, so its gradient sums both uses and it is updated once. The optimizer's update
(updates.py) is then traced on the gradients, one param group at a time, and the results are written back into
their inputs with one `_foreach_copy_`, which torch.compile turns into in-place updates.
"""

from __future__ import annotations

import contextlib

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from dualmode.graph import collectives, diagnose, guards, refusals, updates
from dualmode.graph.report import TraceError
from dualmode.graph.slots import ArgSlot, GradSlot, HasBufferSlot, HyperSlot, Slot, StateSlot, TensorSlot
from dualmode.step import finite, policy
from dualmode.step.view import PER_CALL_ATTRIBUTES


def trace_step(call, slots: list[Slot], examples: list[torch.Tensor]):
    """Trace the step of `call` over `slots`; return (graph module, indices of the slots it reads, tracer)."""
    tracer = StepTracer(call, slots)
    if tracer.reducer is not None:
        tracer.reducer.check_same_parameters(call)
    try:
        # The examples are fake tensors, some with a symbolic batch dimension (batch.py).
        gm = make_fx(tracer, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*examples)
    except (TraceError, policy.BuildError, TypeError, ValueError):
        raise  # dualmode's own errors, and the user's, already name the culprit
    except Exception as error:
        raise diagnose.trace_error(call.step.name, error) from error
    return gm, prune_unused_inputs(gm), tracer


def prune_unused_inputs(gm: torch.fx.GraphModule) -> list[int]:
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


class StepTracer:
    """The function make_fx traces: forward, backward and update, over the step's input slots."""

    def __init__(self, call, slots: list[Slot]):
        self.call, self.slots = call, slots
        self.out_spec = None
        self.out_consts: list = []
        self.reducer = collectives.GradientReducer.for_call(call)  # None unless the step has DDP modules
        self.reads = None  # what build() read from Python (guards.recording)
        self.labels = guards.module_labels(call.step.owner, call.step.name, call.modules)
        self.user_outputs = 0  # the traced function returns build()'s tensors, then:
        self.input_grads: list[int] = []  # the gradients of these arguments (indices into call.leaves), then
        self.finite_names: list[str] | None = None  # with check_finite, one flag per value named here
        self.state_keys: dict[tuple[int, int], list[str]] = {}  # (group, tensor) -> its state keys, as slotted
        for slot in slots:
            if isinstance(slot, StateSlot):
                self.state_keys.setdefault((slot.group, slot.tensor), []).append(slot.key)

    def __call__(self, *flat):
        call = self.call
        values = dict(zip(self.slots, flat))
        originals = call.tensors.tensors
        stand_ins = [values[TensorSlot(i)] for i in range(len(originals))]
        leaves = [values.get(ArgSlot(k), v) for k, v in enumerate(call.leaves)]
        args, kwargs = tree_unflatten(leaves, call.in_spec)
        train = call.optimizer is not None
        if train:
            for t, stand_in, is_param in zip(originals, stand_ins, call.tensors.is_param):
                if is_param and t.requires_grad:
                    stand_in.requires_grad_(True)
        wants_grad = [k for k, v in enumerate(call.leaves) if train and isinstance(v, torch.Tensor) and v.requires_grad]
        for k in wants_grad:
            values[ArgSlot(k)].requires_grad_(True)
        by_id = {id(t): s for t, s in zip(originals, stand_ins)}
        if self.reducer is not None:
            self.reducer.sync_buffers(stand_ins)
        with swapped(call.tensors.modules, by_id), collectives.through_inner_module(call.tensors.modules), \
                (torch.enable_grad() if train else torch.no_grad()):
            out = self._watched_build(args, kwargs)
        flags = self._update(values, stand_ins, out) if train else None
        outs = self._outputs(out)
        self.user_outputs = len(outs)
        self.input_grads = [k for k in wants_grad if values[ArgSlot(k)].grad is not None]
        outs += tuple(values[ArgSlot(k)].grad for k in self.input_grads)
        return outs if flags is None else outs + (flags,)

    def _watched_build(self, args, kwargs):
        """build(), recording what it reads from Python; refused if it assigns attributes or reads step_count."""
        step = self.call.step
        objects = [step.owner] + list({id(m): m for _, top in self.call.modules for m in top.modules()}.values())
        before = refusals.instance_dicts(o for o in objects if o is not None)
        classes = (torch.nn.Module,) if step.owner is None else (torch.nn.Module, type(step.owner))
        with guards.recording(classes) as self.reads:
            out = step.run_build(args, kwargs)
        refusals.check_nothing_assigned(before, self.labels, step.name)
        refusals.check_per_call_reads(self.reads, step.owner, step.name, PER_CALL_ATTRIBUTES)
        return out

    def _outputs(self, out) -> tuple:
        out_leaves, self.out_spec = tree_flatten(out)
        tensor_outs = [v.detach() for v in out_leaves if isinstance(v, torch.Tensor)]
        if len(tensor_outs) == len(out_leaves):
            return tuple(tensor_outs)
        if tensor_outs:
            raise TypeError("graph mode: build() must return tensors only (in any nesting of tuples, lists and "
                            "dicts), or no tensor at all")
        self.out_consts = out_leaves
        return ()

    def _update(self, values: dict, stand_ins: list, out) -> None:
        call, config = self.call, self.call.step.config
        members = []  # (group index, tensor index) of each parameter that got a gradient
        for gi, group in enumerate(call.groups):
            for p in group["params"]:
                ti = call.tensors.index[id(p)]
                if p.requires_grad and stand_ins[ti].grad is not None:
                    if stand_ins[ti].grad.is_sparse:
                        raise TypeError(f"graph mode cannot update {call.tensors.names[ti]!r}: its gradient is "
                                        f"sparse (an embedding with sparse=True?), and {type(call.optimizer).__name__}"
                                        " in a traced step needs dense gradients; run it with mode='eager'")
                    members.append((gi, ti))
        if not members:
            raise policy.no_gradient_error(call.step.name)
        grads = {ti: stand_ins[ti].grad for _, ti in members}
        flags = ok = None
        if config.check_finite:  # the loss and every gradient of this call; where one fails, nothing is written
            loss = finite.loss_for_check(out, call.step.name)
            self.finite_names = [call.tensors.names[ti] for _, ti in members]
            flags = finite.finite_flags(loss, [grads[ti] for _, ti in members])
            if self.reducer is not None:  # every rank skips the same update: one more flag per rank
                flags = torch.cat([flags, self.reducer.agree_finite(flags.all())])
                self.finite_names += [finite.on_rank(r) for r in range(self.reducer.world)]
            ok = flags.all()
        with torch.no_grad():
            if call.phase == "accumulate":
                sums = [values[GradSlot(gi, ti)] for gi, ti in members]
                write(sums, torch._foreach_add(sums, [grads[ti] for _, ti in members]), ok)
                return flags
            if call.phase == "apply":
                grads = {ti: values[GradSlot(gi, ti)] + grads[ti] for gi, ti in members}
            if self.reducer is not None:
                grads = self.reducer.reduce(grads)  # once per update: after the window's sum, before clipping
            grads = self._clipped(grads, members)
            if call.plan.own_step:  # the optimizer's own step(), traced (plans.OwnStep)
                pairs = call.plan.writes(values, members, stand_ins, grads, in_place=ok is None)
                write([dst for dst, _ in pairs], [new for _, new in pairs], ok)
                return flags
            for gi in dict.fromkeys(gi for gi, _ in members):  # one group at a time, in order
                self._update_group(values, gi, [ti for g, ti in members if g == gi], stand_ins, grads, ok)
        return flags

    def _update_group(self, values: dict, gi: int, tis: list[int], stand_ins: list, grads: dict, ok) -> None:
        rule, group = self.call.plan.rule, self.call.groups[gi]
        flags = rule.flags(group)
        states = [{k: values[StateSlot(gi, ti, k)] for k in self.state_keys.get((gi, ti), ())} for ti in tis]
        if rule.lazy:
            for ti, state in zip(tis, states):
                state["has_buffer"] = values[HasBufferSlot(gi, ti)]
        hyper = {name: values[HyperSlot(gi, name)] for name in rule.hyper}
        lr = policy.scaled_lr(values[HyperSlot(gi, "lr")], group, gi)  # lr_scale: a baked constant
        params, group_grads = [stand_ins[ti] for ti in tis], [grads[ti] for ti in tis]
        if rule.foreach:
            new_params, new_states = rule.update(params, group_grads, states, hyper, lr, flags)
        else:
            new_params, new_states = zip(*(rule.update(p, g, state, hyper, lr, flags)
                                           for p, g, state in zip(params, group_grads, states)))
        dsts = params + [state[k] for state, new in zip(states, new_states) for k in new]
        write(dsts, list(new_params) + [v for new in new_states for v in new.values()], ok)

    def _clipped(self, grads: dict, members: list) -> dict:
        """Clip as eager mode does: the sets of groups of `policy.clip_sets`, each to one total norm."""
        grads = dict(grads)
        for clip in policy.clip_sets(self.call.groups, self.call.step.config):
            tis = [ti for gi, ti in members if gi in clip.groups]
            clipped = updates.clip_grads([grads[ti] for ti in tis], clip.max_norm, clip.norm_type)
            grads.update(zip(tis, clipped))
        return grads


@contextlib.contextmanager
def swapped(modules: list[torch.nn.Module], stand_ins: dict[int, torch.Tensor]):
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


def write(dsts: list[torch.Tensor], news: list[torch.Tensor], ok) -> None:
    """Write new values into inputs (one foreach copy, one node in the trace); with the finite check on, keep the
    old values when the loss or a gradient is not finite."""
    if ok is not None:
        news = [torch.where(ok, new, dst) for dst, new in zip(dsts, news)]
    if dsts:
        torch._foreach_copy_(dsts, news)
