"""Graph mode's CPU step keeps its freed buffers for the next call (dualmode/graph/step_buffers.py).

The reference is the same step with config.reuse_buffers=False (every buffer from malloc, as before) and eager
mode: the numbers must be bitwise those of malloc's step, no tensor the user holds may be handed out again, and
the pages of a large activation must stop faulting in at every call.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import dualmode as dm
from dualmode.graph import step_buffers

BACKEND = {"backend": "aot_eager"}  # the allocator is the backend's too: no inductor compile needed


class Step(dm.TrainGraph):
    def __init__(self, model, *, mode="graph", reuse=True, optimizer=True):
        super().__init__(mode=mode, config=dm.StepConfig(compile_options=BACKEND, reuse_buffers=reuse))
        self.model = model
        if optimizer:
            self.add_optimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))

    def build(self, x, y=None):
        if y is None:
            return self.model(x)
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        return loss


def conv_model():
    torch.manual_seed(0)
    # mkldnn's convolutions allocate through the allocator's raw_allocate: they must free through it too.
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def batches(sizes):
    torch.manual_seed(1)
    return [(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))) for n in sizes]


def run(step, data):
    return [float(step(x, y)) for x, y in data]


def test_the_numbers_are_mallocs_and_a_new_batch_size_keeps_only_what_one_call_used():
    data = batches([16, 16, 16, 5, 16, 16])
    reused, plain, eager = Step(conv_model()), Step(conv_model(), reuse=False), Step(conv_model(), mode="eager")
    losses = {"reused": [], "plain": [], "eager": []}
    held = []
    for x, y in data:
        for name, step in (("reused", reused), ("plain", plain), ("eager", eager)):
            short = len(x) == 5 and name != "eager"  # aot_eager's trace keeps no symbolic batch: a recompile
            with pytest.warns(dm.RecompileWarning) if short else contextlib.nullcontext():
                losses[name].append(float(step(x, y)))
        held.append(reused._graph.buffers.pool.held_bytes)
    assert losses["reused"] == losses["plain"]  # bitwise: where the memory comes from changes no number
    torch.testing.assert_close(losses["reused"], losses["eager"], rtol=1e-5, atol=1e-6)
    for a, b in zip(reused.model.parameters(), plain.model.parameters()):
        assert torch.equal(a, b)
    assert held[0] > 1 << 20 and held[1] == held[2]  # a batch of 16 keeps the same blocks call after call
    assert held[3] < held[2]  # the batch of 5 gave back the blocks of 16 it did not take
    assert held[5] == held[2]
    assert "step buffers: reused between calls" in str(reused.explain())
    assert "step buffers: from malloc at every call (config.reuse_buffers=False)" in str(plain.explain())


def test_outputs_the_user_keeps_are_never_handed_out_again():
    # An evaluation graph returns a 64 x 16 x 32 x 32 activation (4 MiB, from the pool) at every call; the user
    # keeps them all, and later calls must not write into them.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
    step, reference = Step(model, optimizer=False), copy.deepcopy(model)
    inputs = [torch.randn(64, 3, 32, 32) for _ in range(4)]
    kept = [step(x) for x in inputs]
    with torch.no_grad():
        for x, out in zip(inputs, kept):
            torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    assert len({out.data_ptr() for out in kept}) == len(kept)


FAULTS = """
import copy, resource, sys, torch
from torch import nn
sys.path.insert(0, {tests!r})
from test_step_buffers import Step

def faults_per_call(step, x, y, calls=4):
    step(x, y)
    step(x, y)  # the pool is full from here on
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        step(x, y)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls

torch.manual_seed(0)
x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
model = nn.Sequential(nn.Linear(64, 40_000), nn.ReLU(), nn.Linear(40_000, 10))
plain = faults_per_call(Step(copy.deepcopy(model), reuse=False), x, y)
reused = faults_per_call(Step(copy.deepcopy(model)), x, y)
print(plain, reused)
"""


def test_a_large_activation_stops_faulting_in_at_every_call():
    # 256 x 40,000 floats: 41 MB, above glibc's largest mmap threshold (32 MiB), so malloc maps it afresh and
    # faults in its 10,000 pages at every call. In a fresh process: another test may have called
    # dm.keep_freed_memory() in this one, and malloc's defaults are the reference.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", FAULTS.format(tests=os.path.dirname(__file__))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    plain, reused = map(float, done.stdout.split())
    assert plain > 10_000
    assert reused < 1_000


def test_turning_it_off_gives_the_pool_back_and_eager_mode_never_uses_it():
    data = batches([8, 8, 8])
    step = Step(conv_model())
    run(step, data[:2])
    pool = step._graph.buffers.pool
    assert pool.held_bytes > 0
    step.config.reuse_buffers = False
    run(step, data[2:])
    assert step._graph.buffers.pool is None and pool.held_bytes == 0
    eager = Step(conv_model(), mode="eager")
    run(eager, data)
    assert eager.explain().buffers is None


def test_an_allocator_that_cannot_be_used_is_named_once_and_the_step_runs_from_malloc(monkeypatch):
    def unbuildable():
        raise RuntimeError("g++ failed on step_buffers.cpp: no compiler here")

    monkeypatch.setattr(step_buffers, "_library", None)
    monkeypatch.setattr(step_buffers, "_failure", None)
    monkeypatch.setattr(step_buffers, "_load", unbuildable)
    data = batches([8, 8])
    step, plain = Step(conv_model()), Step(conv_model(), reuse=False)
    with pytest.warns(RuntimeWarning, match="could not be used: g\\+\\+ failed on step_buffers.cpp"):
        first = float(step(*data[0]))
    assert first == float(plain(*data[0]))
    assert float(step(*data[1])) == float(plain(*data[1]))  # no second warning (pytest: warnings are errors)
    other = Step(conv_model())
    other(*data[0])  # nor for another step in the process
    assert "from malloc at every call: its allocator could not be used: g++ failed" in str(step.explain())


REPLACED = """
import copy, json, sys, warnings, torch
from torch import nn
sys.path.insert(0, {tests!r})
from test_step_buffers import Step

# Linear layers: mkldnn's convolutions allocate raw, which torch's mobile allocator does not support.
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2048), nn.ReLU(), nn.Linear(2048, 10))
data = [(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))) for _ in range(5)]
step, plain = Step(copy.deepcopy(model)), Step(copy.deepcopy(model), reuse=False)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    losses = [float(step(x, y)) for x, y in data[:2]]
    pool = step._graph.buffers.pool
    held = pool.held_bytes
    torch._C._set_default_mobile_cpu_allocator()  # another CPU allocator takes torch's slot (priority 100)
    losses += [float(step(x, y)) for x, y in data[2:]]
    later = Step(copy.deepcopy(model))
    later(*data[0])
print(json.dumps({{"losses": losses, "plain": [float(plain(x, y)) for x, y in data], "held": [held, pool.held_bytes],
                  "pool": step._graph.buffers.pool is None, "explain": str(step.explain()),
                  "warnings": [str(w.message) for w in caught]}}))
"""


def test_an_allocator_replaced_after_steady_calls_is_named_once_and_the_step_goes_on_from_malloc():
    # In a fresh process: torch's slot, once taken with priority 100, cannot be given back.
    done = subprocess.run([sys.executable, "-c", REPLACED.format(tests=os.path.dirname(__file__))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["losses"] == got["plain"]  # bitwise, before and after the allocator changed
    assert got["held"][0] > 0 and got["held"][1] == 0  # the pool gave its blocks back
    assert got["pool"]
    assert "from malloc at every call: its allocator could not be used: torch's CPU allocator was replaced" \
        in got["explain"]
    replaced = [w for w in got["warnings"] if "replaced after it was installed" in w]
    assert len(replaced) == 1, got["warnings"]
