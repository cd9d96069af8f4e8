"""The recompute pass (dualmode/graph/remat.py): same numbers, fewer bytes alive between forward and backward.

The unit tests run the pass on a decomposed forward+backward graph traced with make_fx (no compile) and compare
its outputs with the untouched graph's, bit for bit. The inductor test runs it where graph mode runs it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn import functional as F

import dualmode as dm
from dualmode.graph.remat import recompute_pointwise
from tests.steps import assert_same_state, snapshot

CHANNELS, SIDE, BATCH = 16, 16, 8  # 32768 elements per activation, above remat.MIN_ELEMENTS


def conv_bn_relu6_step(*tensors):
    """Three conv -> BatchNorm -> ReLU6 blocks, a loss, and its gradients: the pattern of MobileNetV2."""
    x, *weights = tensors
    h = x
    for i in range(3):
        conv_w, bn_w, bn_b = weights[3 * i:3 * i + 3]
        h = F.hardtanh(F.batch_norm(F.conv2d(h, conv_w, padding=1), None, None, bn_w, bn_b, training=True), 0, 6)
    loss = h.square().mean()
    return (loss, *torch.autograd.grad(loss, weights))


def step_inputs(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = []
    for _ in range(3):
        weights += [torch.randn(CHANNELS, CHANNELS, 3, 3, generator=g) * 0.1,
                    torch.rand(CHANNELS, generator=g) + 0.5, torch.randn(CHANNELS, generator=g) * 0.1]
    weights = [w.requires_grad_() for w in weights]
    return [torch.randn(BATCH, CHANNELS, SIDE, SIDE, generator=g), *weights]


def traced(fn, inputs) -> torch.fx.GraphModule:
    """fn traced as inductor sees it after decomposition (batch_norm and hardtanh become pointwise ops)."""
    return make_fx(fn, decomposition_table=select_decomp_table())(*inputs)


def peak_live_bytes(graph: torch.fx.Graph) -> int:
    """The most bytes that computed tensors hold at once, each freed after its last use (views count nothing)."""
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last = {n: max([pos[u] for u in n.users], default=pos[n]) for n in nodes}
    sizes = {}
    for n in nodes:
        value = n.meta.get("val")
        is_view = n.op == "call_function" and getattr(n.target, "is_view", False)
        if n.op == "call_function" and isinstance(value, torch.Tensor) and not is_view:
            sizes[n] = value.numel() * value.element_size()
    peak = 0
    for i in range(len(nodes)):
        peak = max(peak, sum(size for n, size in sizes.items() if pos[n] <= i <= last[n]))
    return peak


def test_recompute_gives_bit_identical_results_with_less_memory_alive():
    inputs = step_inputs()
    gm = traced(conv_bn_relu6_step, inputs)
    before_bytes, before_out = peak_live_bytes(gm.graph), gm(*inputs)
    rewritten = recompute_pointwise(gm.graph)
    gm.recompile()
    after_bytes, after_out = peak_live_bytes(gm.graph), gm(*inputs)
    assert rewritten >= 3  # at least the first two blocks' ReLU6 outputs and what they are computed from
    for a, b in zip(before_out, after_out):
        assert torch.equal(a, b)
    assert after_bytes <= 0.8 * before_bytes, (before_bytes, after_bytes)


def test_nothing_is_recomputed_from_a_tensor_that_would_have_to_stay_alive_for_it():
    def step(x, w):
        hidden = torch.mm(x, w)  # not pointwise: recomputing it is not cheap
        act = hidden.sin()  # pointwise, used again at the end; its input `hidden` is dead by then
        filler = act
        for _ in range(40):  # a long stretch between the uses
            filler = torch.mm(filler, w).tanh()
        return filler.sum() + act.sum()

    inputs = [torch.randn(256, 256), torch.randn(256, 256) * 0.05]
    gm = traced(step, inputs)
    code = gm.code
    assert recompute_pointwise(gm.graph) == 0
    gm.recompile()
    assert gm.code == code


def test_nothing_is_recomputed_from_an_input_after_the_graph_writes_to_it():
    def step(p, x):
        act = (p * 2).sin()  # reads the input p, which is overwritten below
        filler = x
        for _ in range(40):
            filler = filler.cos() * 1.5
        p.copy_(filler)
        return act.sum() + p.sum()

    inputs = [torch.randn(256, 256), torch.randn(256, 256)]
    gm = traced(step, [t.clone() for t in inputs])
    assert recompute_pointwise(gm.graph) == 0


def test_a_short_gap_between_uses_is_left_alone():
    inputs = step_inputs()
    gm = traced(conv_bn_relu6_step, inputs)
    assert recompute_pointwise(gm.graph, min_gap=len(gm.graph.nodes)) == 0


class ConvBnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False),
                                                  nn.BatchNorm2d(CHANNELS), nn.ReLU6(inplace=True))
                                    for _ in range(3)])
        self.head = nn.Linear(CHANNELS, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


class ConvStep(dm.TrainGraph):
    def __init__(self, model, mode, config):
        super().__init__(mode=mode, config=config)
        self.model = model
        self.add_optimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))

    def build(self, x, y):
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        return loss


@pytest.mark.inductor
def test_graph_mode_with_inductor_recomputes_and_still_matches_eager():
    torch.manual_seed(0)
    model = ConvBnNet()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(BATCH, CHANNELS, SIDE, SIDE, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(3)]
    results, explained = {}, {}
    # Caches off, so that the pass runs here rather than being skipped by a graph compiled in an earlier run.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        for mode, recompute in (("eager", True), ("graph", True), ("graph", False)):
            step = ConvStep(copy.deepcopy(model), mode, dm.StepConfig(recompute_activations=recompute))
            for x, y in data:
                step(x, y)
            results[mode, recompute] = snapshot(step)
            explained[mode, recompute] = str(step.explain())
    assert "recomputed in the backward: 0 " not in explained["graph", True]
    assert "recomputed in the backward: " in explained["graph", True]
    assert " activations (inductor post-grad pass)" in explained["graph", True]
    assert "recomputed in the backward: off (config.recompute_activations=False)" in explained["graph", False]
    assert_same_state(results["eager", True], results["graph", True])
    assert_same_state(results["graph", False], results["graph", True])
