"""Print what graph mode does with each change of tests/graph/watch_cases.py, and with the other cases of issue 10.

    python benchmarks/watch_table.py

Each row: eager and graph steps in lockstep (aot_eager backend), the change, two more steps; then the compile
count, the warning or error graph mode gave (first line), and the largest parameter difference from eager.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the checkout: tests.steps

import dualmode as dm
from tests.graph.watch_cases import CHANGES, make_watch_step, watch_batches
from tests.steps import FAST, Step, tiny_net


def _first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text[:150]


def _max_diff(a, b) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.model.parameters(), b.model.parameters()))


def run_change(case) -> tuple[str, str]:
    steps = {m: make_watch_step(m) for m in ("eager", "graph")}
    data = watch_batches(3)
    said = ""
    undo = []
    try:
        for i, (x, y) in enumerate(data):
            if i == 1:
                for s in steps.values():
                    undo.append(case.change(s))
            for mode, s in steps.items():
                torch.manual_seed(100 + i)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    s(x, y)
                if mode == "graph" and caught and not said:
                    said = str(caught[0].message).strip().splitlines()[0][:150]
    except Exception as error:  # noqa: BLE001 - the table reports it
        said = _first_line(error)
    finally:
        if case.undo is not None:
            for u in undo:
                case.undo(u)
    return f"{steps['graph'].compile_count}", f"{said or '(nothing)'} | diff {_max_diff(*steps.values()):.2g}"


def _tiny(mode, **config):
    model = tiny_net()
    return Step(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5), mode=mode,
                config=dm.StepConfig(compile_options=dict(FAST), **config))


def _outcome(fn) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn() or "(no error)"
    except Exception as error:  # noqa: BLE001 - the table reports it
        return _first_line(error)


def _build_with(body):
    class Custom(Step):
        def build(self, x, y):
            return body(self, x, y)
    return Custom


def other_cases():
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def loss_of(s, x, y):
        return s.loss_fn(s.model(x), y)

    def calls_step(s, x, y):
        loss = loss_of(s, x, y)
        loss.backward()
        s.optimizer.step()
        return loss

    def normal(s, x, y):
        loss = loss_of(s, x, y)
        loss.backward()
        return loss

    def no_backward(s, x, y):
        return loss_of(s, x, y)

    def nan_grad(s, x, y):
        loss = loss_of(s, x, y)
        (loss + 0 * s.model.fc1.weight.sum() * float("inf")).backward()
        return loss

    def returns_none(s, x, y):
        loss_of(s, x, y).backward()

    def reads_step_count(s, x, y):
        loss = loss_of(s, x, y) * (1.0 + s.step_count)
        loss.backward()
        return loss

    def run(mode, body, *, data=(x, y), check=False, steps=1):
        s = _build_with(body)(tiny_net(), None, mode=mode,
                              config=dm.StepConfig(compile_options=dict(FAST), check_finite=check))
        s.add_optimizer(torch.optim.SGD(s.model.parameters(), lr=0.1))
        before = [p.detach().clone() for p in s.model.parameters()]
        for _ in range(steps):
            s(*data)
        moved = max(float((p.detach() - q).abs().max()) for p, q in zip(s.model.parameters(), before))
        return f"(no error; parameters moved by {moved:.2g}, compiles {s.compile_count})"

    rows = []
    for mode in ("eager", "graph"):
        rows.append((f"build() calls optimizer.step() [{mode}]", _outcome(lambda mode=mode: run(mode, calls_step))))
    rows.append(("build() forgets loss.backward() [graph]", _outcome(lambda: run("graph", no_backward))))
    rows.append(("float64 input, float32 model [graph]",
                 _outcome(lambda: run("graph", normal, data=(x.double(), y)))))
    for mode in ("eager", "graph"):
        rows.append((f"check_finite, NaN gradient, finite loss [{mode}]",
                     _outcome(lambda mode=mode: run(mode, nan_grad, check=True))))
        rows.append((f"check_finite, build() returns None [{mode}]",
                     _outcome(lambda mode=mode: run(mode, returns_none, check=True))))
    rows.append(("build() reads self.step_count [graph]", _outcome(lambda: run("graph", reads_step_count, steps=3))))

    def refused_first_call():
        out = {}
        for mode in ("eager", "graph"):
            s = _tiny(mode, check_finite=True)
            try:
                s(torch.full((16, 6), float("nan")), y)
            except FloatingPointError:
                pass
            s(x, y)
            out[mode] = s
        return f"(after the refused call and one step: diff {_max_diff(out['eager'], out['graph']):.2g})"
    rows.append(("first graph call refused by check_finite, SGD dampening", _outcome(refused_first_call)))

    def input_grad():
        got = {}
        for mode in ("eager", "graph"):
            s = _tiny(mode)
            xi = x.clone().requires_grad_(True)
            s(xi, y)
            got[mode] = xi.grad
        if got["graph"] is None:
            return "(graph: x.grad is None)"
        return f"(x.grad diff {float((got['eager'] - got['graph']).abs().max()):.2g})"
    rows.append(("input with requires_grad=True gets .grad [graph]", _outcome(input_grad)))

    def bad_lr(value):
        def run_it():
            s = _tiny("graph")
            s.optimizer.param_groups[0]["lr"] = value
            s(x, y)
        return run_it
    rows.append(("group lr = nan", _outcome(bad_lr(float("nan")))))
    rows.append(("group lr = -0.1", _outcome(bad_lr(-0.1))))
    return rows


def main() -> None:
    print("| change after the first step | graph compiles | graph mode says / parameter diff vs eager |")
    print("| --- | --- | --- |")
    for case in CHANGES:
        count, said = run_change(case)
        print(f"| {case.name} | {count} | {said} |")
    print()
    print("| case | outcome |")
    print("| --- | --- |")
    for name, outcome in other_cases():
        print(f"| {name} | {outcome} |")


if __name__ == "__main__":
    main()
