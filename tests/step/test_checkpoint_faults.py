"""Faults: a process killed while it saves leaves a checkpoint that loads, and an eager call that raises leaves
the gradients as they were before it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import dualmode as dm
from tests.steps import FAST, Step, assert_bitwise, batches, subprocess_env, tiny_groups, tiny_net

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint_worker.py")


def test_a_process_killed_while_it_saves_leaves_a_checkpoint_that_loads(tmp_path):
    path = tmp_path / "loop.ckpt"
    env = subprocess_env()
    rounds, last_number = 4, 0
    for kill in range(rounds):
        process = subprocess.Popen([sys.executable, WORKER, "loop", str(path)], stdout=subprocess.PIPE, text=True,
                                   env=env)
        try:
            deadline = time.monotonic() + 120
            first = process.stdout.readline()  # one save done: from now on it is saving, over and over
            assert first.strip() == "1", "the saving loop did not start"
            time.sleep(random.Random(kill).uniform(0.05, 0.4))
            assert time.monotonic() < deadline
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait(timeout=30)
            process.stdout.close()
        assert process.returncode == -signal.SIGKILL
        model = nn.Linear(1024, 1024)
        step = Step(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="eager")
        number = dm.load_checkpoint(path, step)["number"]  # the last complete file, never a half-written one
        assert number >= 1
        assert torch.all(model.weight == number) and torch.all(model.bias == number)
        last_number = number
    assert last_number >= 1
    leftovers = [name for name in os.listdir(tmp_path) if name != "loop.ckpt"]
    assert leftovers in ([], [".loop.ckpt.tmp"])  # a killed write's temporary file, overwritten by the next save


# Eager mode: a call that raises leaves no gradient behind ----------------------------------------------------------

class FailingStep(Step):
    fail = False

    def build(self, x, y):
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if self.fail:
            raise RuntimeError("build failed after backward")
        return loss


class FailingAdamW(torch.optim.AdamW):
    fail = False

    def step(self, closure=None):
        if self.fail:
            raise RuntimeError("update failed")
        return super().step(closure)


def make(accumulate: int):
    model = tiny_net(0)
    optimizer = FailingAdamW(tiny_groups(model), lr=1e-2)
    return FailingStep(model, optimizer, mode="eager",
                       config=dm.StepConfig(grad_accumulation_steps=accumulate, compile_options=dict(FAST)))


def grads(step):
    return [None if p.grad is None else p.grad.clone() for p in step.model.parameters()]


@pytest.mark.parametrize("where, accumulate, before", [
    ("build", 1, 2), ("build", 3, 1), ("build", 3, 2),  # between updates; 1 and 2 micro-batches into a window
    ("update", 1, 2), ("update", 3, 2),                 # the update runs at the end of a window only
])
def test_an_eager_call_that_raises_leaves_the_gradients_as_before(where, accumulate, before):
    step, reference = make(accumulate), make(accumulate)
    data = batches(before + 4)
    for x, y in data[:before]:
        step(x, y)
        reference(x, y)
    saved = grads(step)
    assert any(g is not None for g in saved) == (before % accumulate != 0)
    culprit = step if where == "build" else step.optimizer
    culprit.fail = True
    with pytest.raises(RuntimeError, match=f"{where} failed"):
        step(*data[before])
    culprit.fail = False
    assert_bitwise(saved, grads(step), "gradients after the failed call")
    assert (step.step_count, step._micro_steps) == (reference.step_count, reference._micro_steps)
    for x, y in data[before + 1:]:  # the next calls start clean: as if the failed one never happened
        step(x, y)
        reference(x, y)
    assert_bitwise(reference.state_dict(), step.state_dict())


def test_under_torch_distributed_rank_0_writes_and_every_rank_loads(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = subprocess_env(PORT=str(port))
    ranks = [subprocess.Popen([sys.executable, WORKER, "rank", str(tmp_path / "ddp.ckpt")], env={**base, "RANK": r},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in "01"]
    outs = []
    try:
        for process in ranks:
            out, err = process.communicate(timeout=120)
            outs.append((process.returncode, out, err[-2000:]))
    finally:
        for process in ranks:
            process.kill()
    assert [o[:2] for o in outs] == [(0, "rank 0 ok\n"), (0, "rank 1 ok\n")], outs
