"""Graph mode against eager mode for every CPU configuration of torch's own optimizer table (optim_db).

torch's `torch.testing._internal.common_optimizers.optim_db` lists, for each torch.optim optimizer, the
configurations torch tests it with. Each runs three steps in each mode on a tiny net with three lr_scale groups
and a scheduler, in float32 and float64: parameters and optimizer state must match eager mode (torch.optim
itself), with one compile (float64 for the first three configurations of each optimizer, to keep CI time
down). Only the table is read from torch's tests, no other test helper. The sweep uses
dynamo's "eager" backend (same traced graph, no AOT compile) to stay cheap; test_optim_graph.py runs a sample
with inductor.
"""

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as sched

import dualmode as dm
from tests.steps import Step, assert_same_state, batches, snapshot

pytest.importorskip("expecttest")  # torch's test table imports it
from torch.testing._internal.common_optimizers import optim_db

CHEAP = {"backend": "eager", "mode": None, "dynamic": False, "options": None}
NOT_IN_GRAPH_MODE = (torch.optim.LBFGS, torch.optim.SparseAdam)  # a closure; sparse gradients (test_optim_graph)
# float64: torch's capturable code path (traced) and its default one (eager) round the step-count arithmetic
# differently; a wrong formula differs by 1e-3 or more.
TOLERANCE = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-7, "atol": 1e-9}}


F64_PER_OPTIMIZER = 3  # float64 runs the first three configurations of each optimizer, to keep CI time down


def _cases():
    for info in optim_db:
        if info.optim_cls in NOT_IN_GRAPH_MODE:
            continue
        inputs = [i for i in info.optim_inputs_func(device="cpu", dtype=torch.float32) if i.params is None]
        for k, optim_input in enumerate(inputs):
            name = f"{info.optim_cls.__name__}-{optim_input.desc.replace(' ', '_')}"
            yield pytest.param(info.optim_cls, optim_input.kwargs, torch.float32, id=f"{name}-f32")
            if k < F64_PER_OPTIMIZER:
                yield pytest.param(info.optim_cls, optim_input.kwargs, torch.float64, id=f"{name}-f64")


CASES = list(_cases())


def small_net(dtype) -> nn.Module:
    """Two layers, small enough that the sweep's compiles stay cheap; same inputs as steps.TinyNet."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def groups_for(cls, model) -> list[dict]:
    if cls is torch.optim.Muon:  # Muon updates matrices only: the biases are frozen
        for p in model.parameters():
            p.requires_grad_(p.dim() == 2)
    return dm.param_groups(model, [{"params": "0.*", "lr_scale": 0.5}, {"params": "2.*", "lr_scale": 2.0}])


def run(mode, cls, kwargs, dtype, n=3):
    model = small_net(dtype)
    kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    optimizer = cls(groups_for(cls, model), **kwargs)
    scheduler = sched.ExponentialLR(optimizer, gamma=0.8)
    step = Step(model, optimizer, scheduler, mode=mode, config=dm.StepConfig(compile_options=dict(CHEAP)))
    for x, y in batches(n, dtype=dtype):
        step(x, y)
    return step


@pytest.mark.parametrize("cls, kwargs, dtype", CASES)
def test_optim_db_configuration_matches_eager_with_one_compile(cls, kwargs, dtype):
    eager, graph = run("eager", cls, kwargs, dtype), run("graph", cls, kwargs, dtype)
    assert_same_state(snapshot(eager), snapshot(graph), **TOLERANCE[dtype])
    assert graph.compile_count == 1, graph.explain()
    assert [g["lr"] for g in graph.optimizer.param_groups] == [g["lr"] for g in eager.optimizer.param_groups]


def test_the_table_covers_every_closure_free_optimizer_of_torch_optim():
    covered = {info.optim_cls for info in optim_db} - set(NOT_IN_GRAPH_MODE)
    names = {c.__name__ for c in covered}
    assert {"SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "ASGD", "NAdam", "RAdam", "Rprop",
            "Adafactor", "Muon"} <= names
    assert sum(case.values[2] == torch.float32 for case in CASES) >= 80
