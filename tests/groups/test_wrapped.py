"""param_groups and describe see through DistributedDataParallel, DataParallel and torch.compile's wrapper;
a 1-process DDP step runs in both modes (the 2-process runs are in test_distributed.py)."""

from __future__ import annotations

import copy
import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dualmode as dm
from tests.steps import FAST

RULES = [{"params": "fc2.*", "lr_scale": 10.0}, {"params": "*.bias", "lr_scale": 2.0}]


@pytest.fixture
def one_rank(tmp_path):
    """A 1-process gloo group (a file store: no port), destroyed afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_ddp_and_compile_wrappers_are_seen_through(seed_net, one_rank):
    bare = dm.param_groups(seed_net, RULES, default={})
    wrapped = [nn.parallel.DistributedDataParallel(seed_net), nn.DataParallel(seed_net), torch.compile(seed_net)]
    wrapped.append(torch.compile(nn.parallel.DistributedDataParallel(seed_net)))
    for model in wrapped:
        groups = dm.param_groups(model, RULES, default={}, layer_decay=0.5)
        assert [g["names"] for g in groups] == [g["names"] for g in dm.param_groups(seed_net, RULES, default={},
                                                                                    layer_decay=0.5)]
        assert dm.bare_model(model) is seed_net
        assert [g["names"] for g in dm.param_groups(model, RULES, default={})] == [g["names"] for g in bare]
        assert dm.describe(groups, model=model) == dm.describe(groups, model=seed_net)
        assert "module." not in dm.describe(groups, model=model)


def test_a_module_selector_inside_a_wrapped_model_is_named_by_its_bare_name(seed_net, one_rank):
    model = nn.parallel.DistributedDataParallel(seed_net)
    taken = r"rule 1 \(module 'fc1'\) selects no trainable parameter.*'fc1.weight' \(rule 0\)"
    with pytest.warns(UserWarning, match=taken):
        dm.param_groups(model, [{"params": "fc1.*"}, {"params": model.module.fc1}])


class Step(dm.TrainGraph):
    def __init__(self, model, mode):
        super().__init__(mode=mode, config=dm.StepConfig(compile_options=dict(FAST), check_finite=True))
        self.model = model
        self.add_optimizer(torch.optim.SGD(dm.param_groups(model, RULES, default={}), lr=0.1, momentum=0.9))

    def build(self, x, y):
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        return loss


def test_one_rank_ddp_step_matches_the_bare_model_in_both_modes(seed_net, one_rank):
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    reference = Step(copy.deepcopy(seed_net), "eager")
    for _ in range(2):
        reference(x, y)
    for mode in ("eager", "graph"):
        model = nn.parallel.DistributedDataParallel(copy.deepcopy(seed_net))
        step = Step(model, mode)
        for _ in range(2):
            step(x, y)
        for (name, a), b in zip(model.module.named_parameters(), reference.model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, mode=mode, name=name: f"{mode} {name}: {m}")
    explain = str(step.explain())
    assert "collectives in the graph: 2 all_reduce over 1 ranks; gradients in 1 buckets of at most 25 MiB" in explain
    nodes = [n for n in step.graph_module.graph.nodes if "c10d_functional.all_reduce" in str(n.target)]
    assert len(nodes) == 2


def test_a_ddp_steps_state_dict_has_bare_names_and_loads_without_ddp(seed_net, one_rank):
    wrapped = Step(nn.parallel.DistributedDataParallel(copy.deepcopy(seed_net)), "eager")
    wrapped(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,)))
    saved = wrapped.state_dict()
    assert list(saved["modules"]["model"]) == list(seed_net.state_dict())  # no "module." prefix
    bare = Step(seed_net, "eager")
    bare.load_state_dict(saved)
    for a, b in zip(seed_net.parameters(), wrapped.model.module.parameters()):
        assert torch.equal(a, b)
    wrapped.load_state_dict(bare.state_dict())  # and back


def test_eager_accumulation_reduces_once_per_update_and_graph_mode_refuses_a_comm_hook(seed_net, one_rank):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    model = nn.parallel.DistributedDataParallel(seed_net)
    model.register_comm_hook(None, counting_hook)
    step = Step(model, "eager")
    step.config.grad_accumulation_steps = 2
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    for _ in range(4):  # 2 updates
        step(x, y)
    assert step.step_count == 2 and len(calls) == 2 * (max(calls) + 1)  # each bucket once per update
    step.mode = "graph"
    with pytest.raises(TypeError, match="cannot run DDP's communication hook"):
        step(x, y)
