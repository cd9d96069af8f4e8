"""Telling cheaply that tensors are laid out as before: shape, strides, dtype, device, requires_grad.

The steady-state call compares every parameter, buffer and argument, and every optimizer state tensor, with the
call before. Read attribute by attribute from Python that is about 1 us per tensor (a 4-block MLP: 12 us of its
call); torch's own C++ tensor check (`torch._C._dynamo.guards.TensorGuards`, what dynamo's guards were built on)
does the same in about 0.13 us per tensor. It is private, so it is used only where it exists, and a tensor it
rejects is compared again in Python: the C++ check looks at a little more (the dispatch keys), and the Python
comparison is the one that decides.
"""

from __future__ import annotations

from operator import attrgetter, methodcaller

import torch

try:
    from torch._C._dynamo.guards import TensorGuards
except ImportError:  # another torch: the Python comparison alone
    TensorGuards = None

_COLUMNS = (attrgetter("shape"), methodcaller("stride"), attrgetter("dtype"), attrgetter("device"),
            attrgetter("requires_grad"))


def described(tensors: list[torch.Tensor]) -> tuple:
    """The layout of each tensor, column by column (each column a C-level map)."""
    return tuple(list(map(column, tensors)) for column in _COLUMNS)


class LayoutCheck:
    """The layouts of a list of tensors as they were when this was made; `same(now)` compares a new list."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.layouts = described(tensors)
        self._fast = _guards(tensors)

    def same(self, tensors: list[torch.Tensor]) -> bool:
        if self._fast is not None and len(tensors) == len(self.layouts[0]) and self._fast.check(*tensors):
            return True
        if described(tensors) != self.layouts:
            return False
        self._fast = _guards(tensors)  # laid out the same, but the C++ check disagreed (dispatch keys): renew it
        return True


def _guards(tensors: list[torch.Tensor]):
    if TensorGuards is None or not all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return None
    return TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                        dynamic_dims_strides=[list(t.stride()) for t in tensors])
