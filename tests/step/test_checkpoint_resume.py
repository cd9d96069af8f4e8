"""Resuming from a checkpoint gives what never stopping gives: bitwise in a fresh eager process (dropout, AdamW,
OneCycleLR, per-group lr_scale, inside an accumulation window too), within float32 tolerance across modes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dualmode as dm
from tests.steps import (
    FAST,
    Step,
    assert_bitwise,
    assert_same_state,
    batches,
    snapshot,
    subprocess_env,
    tiny_groups,
    tiny_net,
)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint_worker.py")


def run_worker(*argv: str) -> None:
    env = subprocess_env()
    done = subprocess.run([sys.executable, WORKER, *argv], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("accumulate, save_at, calls", [
    (1, 4, 9),   # between two updates
    (3, 7, 12),  # one micro-batch into the third window: the summed gradient must come back
])
def test_fresh_process_resume_is_bitwise_in_eager_mode(tmp_path, accumulate, save_at, calls):
    checkpoint = tmp_path / "run.ckpt"
    common = ["--accumulate", str(accumulate), "--calls", str(calls)]
    run_worker("save", str(checkpoint), str(tmp_path / "straight.pt"), "--save-at", str(save_at), *common)
    run_worker("resume", str(checkpoint), str(tmp_path / "resumed.pt"), *common)
    straight = torch.load(tmp_path / "straight.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert straight["step_count"] == calls // accumulate
    assert_bitwise(straight, resumed)


def test_without_the_windows_gradients_a_resume_differs():
    """What the state adds matters: the same state without the summed gradient gives other parameters."""
    straight, step = _trained(accumulate=3, calls=4), _trained(accumulate=3, calls=4)
    state = step.state_dict()
    other = _fresh(accumulate=3)
    state = dict(state, grads={})  # drop the window's gradients
    state["micro_steps"] = 0
    other.load_state_dict(state)
    for x, y in batches(6)[4:]:
        straight(x, y)
        other(x, y)
    diff = max((a - b).abs().max().item() for a, b in zip(straight.model.parameters(), other.model.parameters()))
    assert diff > 1e-4


def _fresh(accumulate: int, mode: str = "eager", seed: int = 3, frozen_unused: bool = False):
    model = tiny_net(seed)
    # Graph mode gives every trainable parameter of the groups a summed gradient inside a window, zero for the
    # unused layer, which eager mode (None) would then decay: freeze it where a window crosses modes.
    model.unused.requires_grad_(not frozen_unused)
    optimizer = torch.optim.AdamW(tiny_groups(model), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=10)
    config = dm.StepConfig(grad_accumulation_steps=accumulate, compile_options=dict(FAST))
    return Step(model, optimizer, scheduler, mode=mode, config=config)


def _trained(accumulate: int, calls: int, mode: str = "eager", frozen_unused: bool = False):
    step = _fresh(accumulate, mode, frozen_unused=frozen_unused)
    for x, y in batches(calls):
        step(x, y)
    return step


@pytest.mark.parametrize("source_mode, target_mode", [("graph", "eager"), ("eager", "graph")])
@pytest.mark.parametrize("accumulate, calls", [(1, 3), (2, 3)])
def test_a_checkpoint_resumes_in_the_other_mode(tmp_path, source_mode, target_mode, accumulate, calls):
    frozen = accumulate > 1
    source = _trained(accumulate, calls, source_mode, frozen_unused=frozen)
    assert source._micro_steps == (calls % accumulate)
    dm.save_checkpoint(tmp_path / "c.ckpt", source, calls=calls)
    target = _fresh(accumulate, target_mode, seed=9, frozen_unused=frozen)
    assert dm.load_checkpoint(tmp_path / "c.ckpt", target) == {"calls": calls}
    assert (target.step_count, target._micro_steps) == (source.step_count, source._micro_steps)
    for x, y in batches(8)[calls:]:
        source(x, y)
        target(x, y)
    assert target.step_count == source.step_count > 2
    assert_same_state(snapshot(source), snapshot(target))
    assert target.lr_scheduler.get_last_lr() == source.lr_scheduler.get_last_lr()


def test_extra_values_round_trip(tmp_path):
    step = _trained(1, 1)
    extra = {"epoch": 3, "position": [4, (5, 6)], "metrics": {"loss": 0.25, "best": None}, "tag": "run-1",
             "done": False, "mask": torch.arange(5), "dtype": torch.float16}
    dm.save_checkpoint(tmp_path / "c.ckpt", step, **extra)
    back = dm.load_checkpoint(tmp_path / "c.ckpt", _fresh(1))
    assert back.keys() == extra.keys()
    assert torch.equal(back.pop("mask"), extra.pop("mask"))
    assert back == extra


def test_an_extra_value_torch_cannot_load_safely_is_refused_by_name(tmp_path):
    step = _trained(1, 1)
    with pytest.raises(TypeError, match=r"extra value 'history'\[1\]\['when'\] is a object"):
        dm.save_checkpoint(tmp_path / "c.ckpt", step, history=[{}, {"when": object()}])
    assert not os.listdir(tmp_path)


def test_a_compiled_step_loads_a_checkpoint_without_recompiling(tmp_path):
    source = _trained(1, 3, "eager")
    dm.save_checkpoint(tmp_path / "c.ckpt", source)
    target = _trained(1, 1, "graph")  # compiled, one step of its own
    assert target.compile_count == 1
    dm.load_checkpoint(tmp_path / "c.ckpt", target)
    for x, y in batches(6)[3:]:
        source(x, y)
        target(x, y)
    assert target.compile_count == 1
    assert_same_state(snapshot(source), snapshot(target))
