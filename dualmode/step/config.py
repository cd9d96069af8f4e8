"""The options of a training step: `TrainGraph.config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dualmode.step.policy import check_clip_settings


def _default_compile_options() -> dict[str, Any]:
    # dynamic=False: dualmode keys its own cache on input shapes and reports each new one.
    return {"backend": "inductor", "mode": None, "dynamic": False, "options": None}


@dataclass
class StepConfig:
    """Options of a `TrainGraph`, read at every call (change them between calls if you need to).

    Attributes:
        autocast_dtype: run `build()` under `torch.autocast` with this dtype (e.g. `torch.bfloat16` on CPU);
            None for full precision.
        grad_accumulation_steps: k; each call is one micro-batch, the update runs on every k-th call.
        clip_grad_max_norm: clip the gradients of all groups without their own `clip_grad_max_norm` key to this
            total norm before the update; None for no clipping.
        clip_grad_norm_type: the norm used for clipping (2.0, 1.0, float("inf"), ...).
        compile_options: keyword arguments for `torch.compile` in graph mode: backend, mode, dynamic, options.
        max_recompiles: how many recompiles graph mode accepts before it raises `RecompileLimitError`.
        check_finite: raise `FloatingPointError` naming the value when the loss or a gradient is not finite
            (`ValueError` when build() returns no loss); that call changes no parameter, optimizer state,
            accumulated gradient or scheduler, in both modes.
        recompute_activations: graph mode with inductor recomputes cheap activations (BatchNorm, ReLU6, ...)
            in the backward instead of keeping them from the forward (remat.py): same numbers, less memory.
        reuse_buffers: graph mode on the CPU keeps the buffers its compiled step frees for its next call
            instead of giving them back to malloc, which would fault them in again at every step (the price: the
            step's freed buffers stay allocated between calls; step_buffers.py). False gives them back.
        trace_cache: graph mode saves each traced step in inductor's cache directory, and a later process loads
            it instead of tracing build() again when the step, its source files and every value its trace read
            are as they were (saved_trace.py says what is compared, and what is not: values read from the
            environment or files). Off by default; `explain()` says whether a trace was loaded, and why not.
        dynamic_batch: graph mode traces the first dimension of each tensor argument as a symbol, so a new
            batch size (a DataLoader's short last batch) runs the compiled step without compiling again.

    Raises:
        ValueError: a field out of range (grad_accumulation_steps < 1, a clip norm that is not a finite
            positive number, max_recompiles < 0, an unknown compile_options key), named in the message.
        TypeError: a field of the wrong type (autocast_dtype that is not a torch.dtype, compile_options that
            is not a dict, check_finite or recompute_activations that is not a bool).

    Example:
        >>> import torch, dualmode as dm
        >>> config = dm.StepConfig(grad_accumulation_steps=4, clip_grad_max_norm=1.0,
        ...                        compile_options={"backend": "aot_eager"})
        >>> config.clip_grad_norm_type, config.max_recompiles
        (2.0, 8)
        >>> dm.StepConfig(grad_accumulation_steps=0)
        Traceback (most recent call last):
            ...
        ValueError: config.grad_accumulation_steps must be an int >= 1, got 0
    """

    autocast_dtype: torch.dtype | None = None
    grad_accumulation_steps: int = 1
    clip_grad_max_norm: float | None = None
    clip_grad_norm_type: float = 2.0
    compile_options: dict[str, Any] = field(default_factory=_default_compile_options)
    max_recompiles: int = 8
    check_finite: bool = False
    recompute_activations: bool = True
    dynamic_batch: bool = True
    reuse_buffers: bool = True
    trace_cache: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name != "_passed":
            object.__setattr__(self, "_passed", None)  # changed since validate() last passed: check again

    def validate(self) -> None:
        """Raise ValueError or TypeError naming the first bad field. (Called at every step: a config whose fields
        were not set, and whose compile_options are as they were, since it last passed is not checked again.)"""
        passed = self.__dict__.get("_passed")
        if passed is not None and passed == self.compile_options:
            return
        if self.autocast_dtype is not None and not isinstance(self.autocast_dtype, torch.dtype):
            raise TypeError(f"config.autocast_dtype must be a torch.dtype or None, got {self.autocast_dtype!r}")
        k = self.grad_accumulation_steps
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"config.grad_accumulation_steps must be an int >= 1, got {k!r}")
        check_clip_settings(self.clip_grad_max_norm, self.clip_grad_norm_type, "config")
        if not isinstance(self.compile_options, dict):
            raise TypeError(f"config.compile_options must be a dict, got {type(self.compile_options).__name__}")
        unknown = set(self.compile_options) - {"backend", "mode", "dynamic", "options"}
        if unknown:
            raise ValueError(f"config.compile_options has unknown keys {sorted(unknown)}; "
                             "allowed: backend, mode, dynamic, options")
        for name in ("check_finite", "recompute_activations", "dynamic_batch", "reuse_buffers", "trace_cache"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"config.{name} must be True or False, got {getattr(self, name)!r}")
        r = self.max_recompiles
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"config.max_recompiles must be an int >= 0, got {r!r}")
        object.__setattr__(self, "_passed", dict(self.compile_options))
