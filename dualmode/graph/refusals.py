"""What graph mode refuses, naming the culprit, because a traced step could not do what eager mode does.

Checked while tracing: `build()` reading an attribute that changes at every call (step_count), and `build()` or
a `forward` assigning attributes (which a trace would assign once, with stand-in tensors). Checked before every
call: tensor hooks on parameters (they would not fire on the trace's stand-ins) and global module hooks (they
would also run on the compiled step itself).
"""

from __future__ import annotations

from operator import attrgetter

import torch
from torch.nn.modules import module as torch_module

from dualmode.graph.guards import _MISSING, Reads, _shown
from dualmode.graph.report import TraceError


def check_per_call_reads(reads: Reads, owner, owner_name: str, per_call: frozenset) -> None:
    """TraceError when build() read an attribute of the step that changes at every call (step_count)."""
    entry = reads.by_object.get(id(owner))
    for name in sorted(per_call & entry[1]) if entry else ():
        raise TraceError(
            f"{owner_name}.build() reads self.{name}, which changes at every call, but a traced step keeps the "
            f"value it had when traced ({getattr(owner, name)!r}). Pass it as a tensor argument instead "
            f"(step(x, y, torch.tensor(step.{name}))), or run the step with mode='eager'.")


def instance_dicts(objects) -> list[tuple[object, dict]]:
    """Shallow copies of the objects' instance dicts, to see later what a trace assigned."""
    return [(obj, dict(object.__getattribute__(obj, "__dict__"))) for obj in objects]


def check_nothing_assigned(before: list[tuple[object, dict]], labels: dict[int, str], owner_name: str) -> None:
    """TraceError naming an attribute that build() (or a forward) assigned while it was traced.

    build() runs once, on stand-in tensors, while graph mode traces it: an attribute it assigns would keep the
    traced value (or a stand-in tensor) instead of being assigned at every call as in eager mode.
    """
    for obj, old in before:
        new = object.__getattribute__(obj, "__dict__")
        for name in sorted(set(old) | set(new)):
            if old.get(name, _MISSING) is not new.get(name, _MISSING):
                label = labels.get(id(obj), type(obj).__name__)
                assigned = new.get(name, _MISSING)
                _restore(before)
                raise TraceError(
                    f"{owner_name}.build() assigned {label}.{name} while graph mode traced it "
                    f"({_shown(old.get(name, _MISSING))} -> {_shown(assigned)}). A traced step "
                    "runs build() once, on stand-in tensors, so the attribute would not be assigned at each call "
                    "as in eager mode: return the value from build() instead, or run the step with mode='eager'.")


def _restore(before: list[tuple[object, dict]]) -> None:
    """Put every instance dict back as it was before the trace (no stand-in tensor is left behind)."""
    for obj, old in before:
        new = object.__getattribute__(obj, "__dict__")
        for name in [n for n in new if n not in old]:
            del new[name]
        new.update(old)


_TENSOR_HOOKS = attrgetter("_backward_hooks")
_GLOBAL_HOOKS = [(kind, f"_global_{kind}_hooks") for kind in ("forward", "forward_pre", "backward", "backward_pre")]
_ACCUMULATE_HOOKS = attrgetter("_post_accumulate_grad_hooks")


def check_hooks(names: list[str], tensors: list[torch.Tensor], is_param: list[bool]) -> None:
    """Refuse what graph mode cannot run as eager mode does: tensor hooks on parameters, global module hooks."""
    if any(map(_TENSOR_HOOKS, tensors)) or any(map(_ACCUMULATE_HOOKS, tensors)):  # rare: then find which
        for name, t, param in zip(names, tensors, is_param):
            if param and t.requires_grad and (t._backward_hooks or t._post_accumulate_grad_hooks):
                kind = "tensor hook (register_hook)" if t._backward_hooks else "post-accumulate-grad hook"
                raise TypeError(
                    f"graph mode: parameter {name} has a {kind}, which a traced step cannot run at each call as "
                    "eager mode does: remove the hook (clip or scale gradients with config.clip_grad_max_norm or "
                    "in build()) or run the step with mode='eager'")
    for kind, name in _GLOBAL_HOOKS:
        if getattr(torch_module, name):
            raise TypeError(
                f"graph mode: a global module {kind.replace('_', ' ')} hook is registered "
                f"(torch.nn.modules.module.register_module_{kind}_hook); it would run on the compiled step itself "
                "as well as on each module: register it on the modules it is for, or run the step with "
                "mode='eager'")
