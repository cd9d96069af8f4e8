"""Typed input slots of a traced step and the named parts of its cache key.

A slot says where one input tensor of the graph comes from. Slots are frozen dataclasses (not tuples), so two
kinds with the same numbers never compare equal, and messages read their fields by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class TensorSlot:
    """A parameter or buffer of the step's modules (index into StepTensors)."""

    index: int


@dataclass(frozen=True)
class ArgSlot:
    """A tensor among the call's arguments (index into the flattened arguments)."""

    index: int


@dataclass(frozen=True)
class HyperSlot:
    """A numeric hyperparameter of a group (its lr, momentum, betas, ...), as a 0-d float64 runtime input."""

    group: int
    name: str


@dataclass(frozen=True)
class HasBufferSlot:
    """Whether the optimizer already holds the lazily created state of a parameter (a 0-d bool input)."""

    group: int
    tensor: int


@dataclass(frozen=True)
class StateSlot:
    """One optimizer state tensor of a parameter."""

    group: int
    tensor: int
    key: str


@dataclass(frozen=True)
class GradSlot:
    """The gradient summed so far of a parameter, with gradient accumulation."""

    group: int
    tensor: int


@dataclass(frozen=True)
class ApplySlot:
    """With gradient accumulation: whether this micro-step is the k-th, which updates (a 0-d bool input)."""


Slot = TensorSlot | ArgSlot | HyperSlot | HasBufferSlot | StateSlot | GradSlot | ApplySlot


class TensorSignature(NamedTuple):
    """What the compiled step assumes of one parameter or buffer."""

    name: str
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool
    strides: tuple


class InputSignature(NamedTuple):
    """What the compiled step assumes of one leaf of the call's arguments (a tensor, or a baked constant)."""

    kind: str  # "tensor" or "const"
    shape: tuple = ()
    strides: tuple = ()
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    value: str = ""


class GroupSignature(NamedTuple):
    """What the compiled step assumes of one param group: its parameters, switches and clip setting."""

    params: tuple
    switches: tuple  # the update rule's flags, a NamedTuple with one named field per switch
    clip: tuple


def input_signature(v) -> InputSignature:
    if isinstance(v, torch.Tensor):
        return InputSignature("tensor", tuple(v.shape), tuple(v.stride()), v.dtype, v.device)
    return InputSignature("const", value=repr(v))
