"""config.trace_cache: a traced step saved by one process and loaded by the next, and every change that must
stop the load (saved_trace.py, lasting.py).

Each run is a fresh Python process running a small training program of its own file, as a user restarts a
script; the programs share one inductor cache directory per test. Backend aot_eager: no C++ compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROGRAM = '''
import json, sys, threading
import torch, torch.nn as nn
import dualmode as dm

settings = json.loads(sys.argv[1])
ALPHA = settings.get("alpha", 0.5)


def scale_hook(factor):
    def hook(module, inputs, output):
        return output * factor
    return hook


class Step(dm.TrainGraph):
    def __init__(self, mode):
        super().__init__(mode=mode, config=dm.StepConfig(compile_options={"backend": "aot_eager"},
                                                         trace_cache=settings.get("cache", True)))
        self.model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        self.loss_fn = nn.CrossEntropyLoss()
        self.weight = settings.get("weight", 1.0)
        if "lock" in settings:
            self.lock = threading.Lock()
        self.model[2].register_forward_hook(scale_hook(settings.get("hook", 1.0)))
        self.add_optimizer(torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9))

    def build(self, x, y):
        if "lock" in settings:
            self.lock.locked()
        loss = self.loss_fn(self.model(x), y) * self.weight + ALPHA * self.model[0].weight.square().sum()
        loss.backward()
        return loss


class Evaluate(dm.TrainGraph):  # no optimizer: an evaluation graph, saved and loaded as well
    def __init__(self, model, mode):
        super().__init__(mode=mode, config=dm.StepConfig(compile_options={"backend": "aot_eager"},
                                                         trace_cache=settings.get("cache", True)))
        self.model = model

    def build(self, x):
        return self.model(x).softmax(dim=1)


def run(mode):
    torch.manual_seed(0)
    step = Step(mode)
    data = torch.Generator().manual_seed(1)
    losses = []
    for size in (6, 6, 5):  # a short last batch: the saved step has a symbolic batch dimension
        x, y = torch.randn(size, 8, generator=data), torch.randint(0, 4, (size,), generator=data)
        losses.append(float(step(x, y)))
    step.model.eval()
    evaluate = Evaluate(step.model, mode)
    probabilities = evaluate(torch.randn(4, 8, generator=data)).flatten().tolist()
    params = [p.detach().flatten().tolist() for p in step.model.parameters()]
    return step, evaluate, losses, params + [probabilities]


graph, evaluate, losses, params = run("graph")
_, _, eager_losses, eager_params = run("eager")
sources = [r.trace_source for r in graph.explain().compiles + evaluate.explain().compiles]
print(json.dumps({"losses": losses, "params": params, "eager_losses": eager_losses, "eager_params": eager_params,
                  "sources": sources, "compiles": graph.compile_count}))
'''


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(PROGRAM)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}

    def run(**settings):
        done = subprocess.run([sys.executable, str(path), json.dumps(settings)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Warning" not in done.stderr, done.stderr[-3000:]  # a load that warns is not a clean load
        return json.loads(done.stdout.strip().splitlines()[-1])

    run.path, run.traces = path, tmp_path / "cache" / "dualmode" / "traces"
    return run


def _close(a, b):
    flat = lambda values: [v for row in values for v in (row if isinstance(row, list) else [row])]  # noqa: E731
    return all(abs(x - y) <= 1e-5 * (1 + abs(y)) for x, y in zip(flat(a), flat(b), strict=True))


def test_a_later_process_loads_the_trace_until_something_it_read_changes(program):
    first = program()
    assert first["sources"] == [f"traced; saved for later processes ({program.traces})"] * 2  # step, evaluation
    assert len(list(program.traces.iterdir())) == 2
    second = program()
    assert second["compiles"] == 1 and all(s.startswith("loaded from a saved trace in ") for s in second["sources"])
    assert second["losses"] == first["losses"] and second["params"] == first["params"]  # bitwise
    assert _close(second["losses"], second["eager_losses"]) and _close(second["params"], second["eager_params"])

    settings = {}
    for change, why in [({"alpha": 0.7}, "the global __main__.ALPHA differs"),  # a module constant
                        ({"weight": 3.0}, "Step.weight differs"),  # an attribute of the step
                        ({"hook": 2.0}, "model.2._forward_hooks differs")]:  # a value in a hook's closure
        settings.update(change)
        changed = program(**settings)
        assert changed["sources"][0] == (f"traced (the saved trace was not used: {why}); saved for later "
                                         f"processes ({program.traces})")
        assert changed["losses"] != first["losses"]
        assert _close(changed["losses"], changed["eager_losses"])
        assert _close(changed["params"], changed["eager_params"])
    assert program(**settings)["sources"][0].startswith("loaded from")  # the new trace replaced the old one

    program.path.write_text(program.path.read_text().replace("square().sum()", "abs().sum()"))
    edited = program(**settings)
    assert edited["sources"][0].startswith(f"traced (the saved trace was not used: {program.path} changed)")
    assert _close(edited["losses"], edited["eager_losses"])
    assert len(list(program.traces.iterdir())) == 2  # one file per cache key, the latest trace


def test_a_value_without_meaning_in_another_process_is_not_saved(program):
    run = program(lock=True)
    assert run["sources"][0] == "traced; not saved: Step.lock: a _thread.lock value"
    assert run["sources"][1].startswith("traced; saved")  # the evaluation graph read no lock
    assert len(list(program.traces.iterdir())) == 1


def test_off_by_default_nothing_is_saved(program):
    assert program(cache=False)["sources"] == ["", ""]
    assert not program.traces.exists()
