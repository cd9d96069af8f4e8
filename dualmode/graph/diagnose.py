"""Turning an error raised while tracing or first running a compiled step into one that names the user's mistake.

Tracer and dynamo errors wrap the real cause: a float64 input to a float32 model surfaces as dynamo's
"Attempt to trace generator", with the dtype error in `__context__`. The message leads with the cause (and
the line of the user's code that raised it, when there is one), then says what to do.
"""

from __future__ import annotations

import os
import traceback

import torch

from dualmode.graph.report import TraceError
from dualmode.graph.slots import GradSlot, StateSlot

_INTERNAL = ("torch", "dualmode", "functorch", "sympy")
_DATA_DEPENDENT = ("DataDependent", "GuardOnDataDependentSymNode", "DynamicOutputShape")


def _chain(error: BaseException) -> list[BaseException]:
    seen, out = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def _is_internal(error: BaseException) -> bool:
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch._subclasses", "torch.fx"))


def root_cause(error: BaseException) -> BaseException:
    """The innermost error of the chain that is not a tracer's or compiler's own (the first one if all are)."""
    chain = _chain(error)
    user = [e for e in chain if not _is_internal(e)]
    return user[-1] if user else chain[-1]


def _user_line(error: BaseException) -> str:
    """'file.py:12: `if loss > 0:`' for the last frame of the traceback outside torch and dualmode, or ''."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        parts = os.path.normpath(frame.filename).split(os.sep)
        if not any(p in _INTERNAL or p.startswith("torch") for p in parts[-4:-1]) and "site-packages" not in parts:
            return f" (at {os.path.basename(frame.filename)}:{frame.lineno}: `{(frame.line or '').strip()}`)"
    return ""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def trace_error(step_name: str, error: BaseException) -> TraceError:
    """A TraceError for an exception make_fx raised while tracing build()."""
    chain = _chain(error)
    if any(any(k in type(e).__name__ for k in _DATA_DEPENDENT) for e in chain):
        where = next((_user_line(e) for e in chain if _user_line(e)), "")
        return TraceError(
            f"{step_name}.build() needs the Python value of a tensor{where}: .item(), an `if` or `while` on a "
            "tensor, or a shape that depends on values cannot be traced into one graph. Use tensor operations "
            f"(torch.where) instead, or run the step with mode='eager'. Tracer's message: {_first_line(chain[-1])}")
    cause = root_cause(error)
    return TraceError(f"{step_name}.build() failed while graph mode traced it: {_first_line(cause)}"
                      f"{_user_line(cause)}. Run it with mode='eager' to see the error in plain PyTorch.")


def first_run_error(step_name: str, error: BaseException, args: list, tensors: list) -> TraceError:
    """A TraceError for an exception raised by the first run of the compiled step (torch.compile's work)."""
    cause = root_cause(error)
    hint = _dtype_hint(args, tensors)
    return TraceError(f"{step_name}: the compiled step failed on its first run: {_first_line(cause)}{hint}. "
                      "Nothing was cached or updated; run the step with mode='eager' to see the error in plain "
                      "PyTorch.")


def _dtype_hint(args: list, tensors: list) -> str:
    """' (input 0 is float64, the parameters are float32)' when floating dtypes of inputs and parameters differ."""
    params = {t.dtype for t in tensors if t.is_floating_point()}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and params and a.dtype not in params:
            shown = ", ".join(sorted(str(d).replace("torch.", "") for d in params))
            return f" (input {i} is {str(a.dtype).replace('torch.', '')}, the parameters are {shown})"
    return ""


def layout_error(call, compiled, position: int, tensor) -> RuntimeError:
    """A RuntimeError naming an input of a compiled variant whose shape, strides or dtype differ from the trace's.

    Graph mode's cache key covers the layout of parameters, buffers and arguments, not that of optimizer state or
    gradients a user replaced by hand; the compiled code assumes the traced layout, so such a call is refused.
    """
    slot = compiled.slots[position]
    traced = compiled.fetch.traced(position)
    return RuntimeError(
        f"{call.step.name}: {_slot_name(call, slot)} has shape {tuple(tensor.shape)}, strides {tensor.stride()} and "
        f"dtype {tensor.dtype}, but the compiled step was traced with shape {traced[0]}, strides {traced[1]} and "
        f"dtype {traced[2]}; nothing was computed or updated. Keep it as torch.optim creates it "
        "(torch.zeros_like of the parameter, or .contiguous()), or run the step with mode='eager'.")


def _slot_name(call, slot) -> str:
    if isinstance(slot, StateSlot):
        return f"the optimizer state {slot.key!r} of {call.tensors.names[slot.tensor]}"
    if isinstance(slot, GradSlot):
        return f"the gradient of {call.tensors.names[slot.tensor]}"
    return f"input {slot}"
