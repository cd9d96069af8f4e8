"""What changed between two compiled variants of a step, in a sentence: the reason a recompile warning gives."""

from __future__ import annotations


def describe_change(name: str, old, new) -> str:
    """A short sentence naming what changed between two compiled variants (fields read by name)."""
    if name == "lr_scale":
        diffs = [f"group {i}: {a} -> {b}" for i, (a, b) in enumerate(zip(old, new)) if a != b]
        return "lr_scale changed (" + ", ".join(diffs or [f"{len(old)} -> {len(new)} groups"]) + ")"
    if name == "inputs":
        (old_spec, old_leaves), (new_spec, new_leaves) = old, new
        if old_spec != new_spec or len(old_leaves) != len(new_leaves):
            return "the structure of the inputs changed"
        for i, (a, b) in enumerate(zip(old_leaves, new_leaves)):
            if a != b:
                if a.kind == b.kind == "tensor" and a.shape != b.shape:
                    return f"new input shape: input {i} {_shape(a)} -> {_shape(b)}" + _shape_hint(a, b)
                return f"input {i} changed: {_fields_changed(a, b)}"
    if name == "tensors":
        old_by_name = {o.name: o for o in old}
        for n in new:
            o = old_by_name.get(n.name)
            if o is None:
                return f"new parameter or buffer {n.name!r}"
            for field in ("requires_grad", "shape", "dtype", "device", "strides"):
                if getattr(o, field) != getattr(n, field):
                    return f"{field} of {n.name!r} changed: {getattr(o, field)} -> {getattr(n, field)}"
        return "parameters or buffers were removed"
    if name == "groups":
        if len(old) != len(new):
            return f"param groups changed: {len(old)} -> {len(new)} groups (add_param_group?)"
        for i, (a, b) in enumerate(zip(old, new)):
            if a.params != b.params:
                return f"param group {i} changed its parameters: {len(a.params)} -> {len(b.params)} tensors"
            if a.switches != b.switches:
                return f"param group {i} changed its switches: {_fields_changed(a.switches, b.switches)}"
            if a.clip != b.clip:
                return f"param group {i} changed its clip setting (max norm, norm type): {a.clip} -> {b.clip}"
    if name == "training":
        return "train/eval mode of a module changed"
    return f"{name} changed: {old} -> {new}"


def _shape(signature) -> str:
    return "(" + ", ".join("batch" if isinstance(d, str) else str(d) for d in signature.shape) + ")" \
        if any(isinstance(d, str) for d in signature.shape) else str(signature.shape)


def _shape_hint(old, new) -> str:
    """How to avoid this recompile: a new batch size only recompiles where the batch could not stay symbolic."""
    if len(old.shape) == len(new.shape) and old.shape[1:] == new.shape[1:]:
        return ("; the batch dimension could not stay symbolic here (build() uses the batch size as a number, "
                "a batch of 1, or config.dynamic_batch=False): use drop_last=True in the DataLoader or pad the "
                "short batch to avoid the recompile")
    return "; only the first (batch) dimension may change without a recompile: pad or crop inputs to one shape"


def _fields_changed(old, new) -> str:
    """'a: x -> y, b: ...' for the fields of two NamedTuples that differ."""
    return ", ".join(f"{f}: {getattr(old, f)} -> {getattr(new, f)}" for f in old._fields
                     if getattr(old, f) != getattr(new, f))
