"""Small models and TrainGraph subclasses shared by the step tests."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

import dualmode as dm

# The cheap backend for most parity tests: same trace, no C++ compile. Tests marked `inductor` use the real one.
FAST = {"backend": "aot_eager", "mode": None, "dynamic": False, "options": None}


class TinyNet(nn.Module):
    """Two layers that train, one frozen-able layer, and an unused layer whose grad stays None."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class Step(dm.TrainGraph):
    def __init__(self, model, optimizer=None, scheduler=None, *, mode="graph", config=None):
        super().__init__(mode=mode, config=config or dm.StepConfig(compile_options=dict(FAST)))
        self.model = model
        self.loss_fn = nn.CrossEntropyLoss()
        if optimizer is not None:
            self.add_optimizer(optimizer, lr_sch=scheduler)

    def build(self, x, y):
        if self.optimizer is None:
            return self.model(x)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        return loss


def tiny_net(seed: int = 0, dtype=torch.float32) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().to(dtype)


def batches(n: int, batch: int = 16, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=g, dtype=dtype), torch.randint(0, 3, (batch,), generator=g))
            for _ in range(n)]


def tiny_groups(model: TinyNet) -> list[dict]:
    """Three groups with distinct lr_scale, the unused layer included (its grad stays None)."""
    return dm.param_groups(model, [
        {"params": "fc1.*", "lr_scale": 0.5},
        {"params": "head.*", "lr_scale": 2.0},
    ], default={"lr_scale": 1.0})


def snapshot(step: dm.TrainGraph) -> tuple[dict, dict]:
    """Deep copies of the model's parameters and buffers and of the optimizer's per-parameter state."""
    model_state = copy.deepcopy(step.model.state_dict())
    opt_state = copy.deepcopy(step.optimizer.state_dict()["state"]) if step.optimizer else {}
    return model_state, opt_state


def assert_same_state(a: tuple[dict, dict], b: tuple[dict, dict], rtol=1e-4, atol=1e-5) -> None:
    (model_a, opt_a), (model_b, opt_b) = a, b
    assert model_a.keys() == model_b.keys()
    for k in model_a:
        torch.testing.assert_close(model_a[k], model_b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    assert opt_a.keys() == opt_b.keys(), f"optimizer state for params {sorted(opt_a)} vs {sorted(opt_b)}"
    for i in opt_a:
        assert opt_a[i].keys() == opt_b[i].keys(), f"param {i}: state keys {sorted(opt_a[i])} vs {sorted(opt_b[i])}"
        for k in opt_a[i]:
            torch.testing.assert_close(opt_a[i][k], opt_b[i][k], rtol=rtol, atol=atol,
                                       msg=lambda m, i=i, k=k: f"state[{i}][{k}]: {m}")


def assert_bitwise(a, b, where: str = "state") -> None:
    """Nested dicts, lists and tuples of tensors and plain values: equal bit for bit, dtypes included."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a, key=str)} vs {sorted(b, key=str)}"
        for k in a:
            assert_bitwise(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra: str) -> dict:
    """The environment for a test's child process: this checkout's dualmode first on the path."""
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}
