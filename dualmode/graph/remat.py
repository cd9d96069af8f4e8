"""Recompute cheap activations in the backward instead of keeping them alive from the forward.

Graph mode traces forward, backward and update into one graph (trace.py), so it does not go through
AOTAutograd's partitioner, which is what decides, for `torch.compile(model)`, to keep a convolution's output
and recompute the BatchNorm + ReLU6 after it in the backward. Without that, the whole-step graph keeps every
activation the eager backward reads: in MobileNetV2 at batch 64 the ReLU6 outputs alone are 360 MiB, held
from the forward to the backward, and every step touches that memory afresh.

`recompute_pointwise` does the same for the whole-step graph, after inductor has functionalized and decomposed
it (a post-grad pass): a large output of a pointwise op (or a chain of them) whose uses are split by a long
gap gets a copy of its computation placed just before its late uses, provided everything that copy reads is
alive there anyway (an input, a tensor the backward reads itself) or small (per-channel statistics). The copy
computes the same ops on the same values, so the numbers do not change; the forward's buffer dies early.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
         aten.expand.default, aten.permute.default, aten.t.default, aten._unsafe_view.default}
MIN_ELEMENTS = 1 << 14  # smaller outputs are not worth a recompute
SMALL_RATIO = 8  # an input this many times smaller than the output may be kept alive for the copy
MAX_CHAIN = 12  # ops in one recomputed chain


def recompute_pointwise(graph: torch.fx.Graph, min_gap: int | None = None) -> int:
    """Rewrite `graph` in place; return how many outputs now get recomputed for their late uses.

    min_gap: how many nodes must separate two uses of an output for the later ones to get a copy (default:
    a twentieth of the graph, so that only forward-to-backward distances qualify).
    """
    nodes = list(graph.nodes)
    pos = {n: float(i) for i, n in enumerate(nodes)}
    gap = min_gap if min_gap is not None else max(16, len(nodes) // 20)
    first_write = _first_write_to_inputs(nodes, pos)
    rewritten = 0
    for node in nodes:
        if not (_recomputable(node) and _numel(node) >= MIN_ELEMENTS):
            continue
        late = _late_users(node, pos, gap)
        if not late:
            continue
        at = pos[late[0]]
        chain = _plan(node, at, pos, first_write)
        if chain is None:
            continue
        copies: dict[torch.fx.Node, torch.fx.Node] = {}
        step = 0.5 / (len(chain) + 1)
        with graph.inserting_before(late[0]):
            for i, original in enumerate(chain):
                copies[original] = graph.node_copy(original, lambda n, c=copies: c.get(n, n))
                pos[copies[original]] = at - 0.5 + step * (i + 1)
        for user in late:
            user.replace_input_with(node, copies[node])
        rewritten += 1
    graph.lint()
    return rewritten


class RecomputePass(CustomGraphPass):
    """`recompute_pointwise` as an inductor post-grad pass (`post_grad_custom_pre_pass`), cache-keyed by this file.

    `rewritten` lists, per graph the pass ran on, how many outputs it made recompute.
    """

    def __init__(self):
        self.rewritten: list[int] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.rewritten.append(recompute_pointwise(graph))

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def installed(recompute: RecomputePass | None) -> AbstractContextManager:
    """Inductor's config with `recompute` as its post-grad pass (for the call that compiles); nothing if None.

    A `post_grad_custom_pre_pass` of the user's own in `compile_options["options"]` is applied by torch.compile
    inside this and so replaces ours.
    """
    if recompute is None:
        return nullcontext()
    return inductor_config.patch(post_grad_custom_pre_pass=recompute)


def _recomputable(node: torch.fx.Node) -> bool:
    """A pure op whose copy computes exactly what it did: pointwise (not random, not in place) or a view."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if target in VIEWS:
        return True
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return torch.Tag.pointwise in target.tags or target is torch.ops.prims.convert_element_type.default


def _numel(node: torch.fx.Node) -> int:
    value = node.meta.get("val")
    return value.numel() if isinstance(value, torch.Tensor) else 0


def _late_users(node: torch.fx.Node, pos: dict, gap: int) -> list[torch.fx.Node]:
    """The users after the first gap of at least `gap` nodes between consecutive uses; none if no such gap."""
    users = sorted(node.users, key=pos.__getitem__)
    last = pos[node]
    for i, user in enumerate(users):
        if pos[user] - last >= gap:
            return users[i:] if all(u.op != "output" for u in users[i:]) else []
        last = pos[user]
    return []


def _alive_at(node: torch.fx.Node, at: float, pos: dict) -> bool:
    return any(pos[u] >= at for u in node.users)


def _first_write_to_inputs(nodes: list, pos: dict) -> dict:
    """For each graph input that the graph updates in place (parameters, state), the position of the first write."""
    writes: dict[torch.fx.Node, float] = {}
    for n in nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
            for arg in n.args[:1]:
                if isinstance(arg, torch.fx.Node) and arg.op == "placeholder":
                    writes.setdefault(arg, pos[n])
    return writes


def _plan(node: torch.fx.Node, at: float, pos: dict, first_write: dict) -> list[torch.fx.Node] | None:
    """The nodes to copy (in graph order) so that `node` can be computed again at `at`; None if that costs memory.

    The copy may read: graph inputs not yet written at `at`, tensors that are alive at `at` anyway, and small
    tensors; a large pointwise intermediate that is dead by then is itself recomputed (up to MAX_CHAIN ops).
    """
    chain: set[torch.fx.Node] = set()
    size = _numel(node)

    def visit(n: torch.fx.Node, must_copy: bool) -> bool:
        if n in chain:
            return True
        if not must_copy:
            if n.op == "placeholder":
                return first_write.get(n, float("inf")) >= at
            if n.op == "get_attr" or _alive_at(n, at, pos) or _numel(n) * SMALL_RATIO <= size:
                return True
        if not _recomputable(n) or len(chain) >= MAX_CHAIN:
            return False
        chain.add(n)
        return all(visit(arg, False) for arg in n.all_input_nodes)

    if not visit(node, True):
        return None
    return sorted(chain, key=pos.__getitem__)

