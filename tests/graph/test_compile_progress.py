"""The call that compiles says so while it runs (logger "dualmode", or stderr where logging is not set up),
and explain() splits it into trace, AOTAutograd and inductor (no dynamo)."""

import logging
import time

import pytest
import torch

from dualmode.graph import progress
from dualmode.graph.compile import CompileSplit
from tests.steps import Step, batches, tiny_groups, tiny_net


def graph_step():
    model = tiny_net()
    return Step(model, torch.optim.SGD(tiny_groups(model), lr=0.1), mode="graph")


def test_first_call_logs_start_and_end_with_the_split_and_later_calls_log_nothing(caplog):
    step = graph_step()
    (x, y), = batches(1)
    with caplog.at_level(logging.INFO, logger="dualmode"):
        step(x, y)
        first = [r.getMessage() for r in caplog.records if r.name == "dualmode"]
        caplog.clear()
        step(x, y)
        later = [r.getMessage() for r in caplog.records if r.name == "dualmode"]
    assert len(first) == 2, first
    assert first[0].startswith("Step (step, ") and "compiling" in first[0]
    assert first[1].startswith("Step (step, ") and "compiled in" in first[1]
    for stage in ("trace", "no dynamo", "AOTAutograd", "inductor 0.00 s", "no kernel generated"):  # aot_eager
        assert stage in first[1]
    assert later == []
    split = step.explain().compiles[0].split
    assert isinstance(split, CompileSplit) and split.inductor_s == 0.0 and split.kernels == 0
    assert "first call: trace" in str(step.explain())


def test_without_logging_configured_a_long_compile_says_so_on_stderr(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_configured", lambda: False)
    with progress.CompileProgress("Step (step)", quiet_after_s=0.0, heartbeat_s=0.01) as p:
        deadline = time.monotonic() + 10
        while "still compiling" not in capsys.readouterr().err and time.monotonic() < deadline:
            time.sleep(0.01)
        p.summary = "trace 0.1 s"
    err = capsys.readouterr().err
    assert "[dualmode] Step (step): compiled in" in err and "(trace 0.1 s)" in err


def test_a_short_compile_prints_nothing_and_the_logger_level_silences_the_fallback(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_configured", lambda: False)
    with progress.CompileProgress("Step (step)", quiet_after_s=60.0):
        pass
    monkeypatch.setattr(progress.LOGGER, "level", logging.WARNING)
    with progress.CompileProgress("Step (step)", quiet_after_s=0.0, heartbeat_s=0.01):
        time.sleep(0.1)
    assert capsys.readouterr().err == ""


def test_a_failed_compile_says_it_failed(caplog):
    with caplog.at_level(logging.INFO, logger="dualmode"), pytest.raises(RuntimeError), \
            progress.CompileProgress("Step (step)"):
        raise RuntimeError("boom")
    assert "compiling failed after" in caplog.records[-1].getMessage()
