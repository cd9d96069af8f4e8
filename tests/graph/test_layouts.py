"""LayoutCheck (graph/layouts.py) says "same" exactly when shape, strides, dtype, device and requires_grad are,
with torch's C++ tensor check and without it (the Python comparison alone)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dualmode.graph import layouts
from dualmode.graph.layouts import LayoutCheck


@pytest.fixture(params=["c++ check", "python only"])
def check_kind(request, monkeypatch):
    if request.param == "python only":
        monkeypatch.setattr(layouts, "TensorGuards", None)
    return request.param


def tensors() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(4, 3)), torch.randn(5), torch.randn(2, 3, 4)]


def relaid(ts: list, i: int, new: torch.Tensor) -> list:
    return ts[:i] + [new] + ts[i + 1:]


def test_the_same_tensors_and_new_tensors_of_the_same_layouts_are_the_same(check_kind):
    ts = tensors()
    check = LayoutCheck(ts)
    assert check.same(ts)
    assert check.same([nn.Parameter(torch.zeros(4, 3)), torch.zeros(5), torch.zeros(2, 3, 4)])


CHANGES = {
    "shape": lambda ts: relaid(ts, 1, torch.randn(6)),
    "strides": lambda ts: relaid(ts, 2, torch.randn(4, 3, 2).permute(2, 1, 0)),
    "dtype": lambda ts: relaid(ts, 1, torch.randn(5, dtype=torch.float64)),
    "requires_grad": lambda ts: relaid(ts, 0, nn.Parameter(torch.randn(4, 3), requires_grad=False)),
    "one tensor fewer": lambda ts: ts[:2],
}


@pytest.mark.parametrize("change", CHANGES)
def test_each_layout_change_is_seen(check_kind, change):
    ts = tensors()
    check = LayoutCheck(ts)
    assert not check.same(CHANGES[change](ts))
    assert check.same(ts)  # and the old layout is still the one compared with


def test_data_replaced_in_place_under_the_same_parameter_is_seen(check_kind):
    ts = tensors()
    check = LayoutCheck(ts)
    ts[0].data = torch.randn(3, 4).t()  # same shape, transposed strides, same Parameter object
    assert not check.same(ts)


def test_a_difference_only_the_cpp_check_sees_is_the_same_layout_and_renews_it():
    # A plain tensor in place of a Parameter: another Python type (the C++ check compares it), the same layout.
    ts = tensors()
    check = LayoutCheck(ts)
    plain = relaid(ts, 0, ts[0].detach().requires_grad_(True))
    assert check.same(plain)
    assert check.same(plain)
