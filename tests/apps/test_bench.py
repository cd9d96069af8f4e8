"""`dualmode bench`: its options, and a tiny real run (worker processes, JSON, plot). No timing assertions."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from dualmode.apps.bench import command as bench
from dualmode.apps.bench.variants import VARIANTS

TINY = ["--model", "mlp", "--hidden", "16", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--burst", "2",
        "--backend", "aot_eager", "--pause-ms", "0"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dualmode bench")
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_command_interface():
    assert bench.NAME == "bench"
    assert isinstance(bench.HELP, str) and bench.HELP
    assert callable(bench.run)


def test_defaults_run_every_variant_but_the_recompute_comparison():
    args = parse([])
    assert (args.model, args.batch_size, args.backend, args.cold_cache) == ("mlp", 64, "inductor", False)
    assert (args.burst, args.pause_ms, args.compile_mode) == (1, bench.PAUSE_MS, None)
    assert args.modes == ["eager", "graph", "torch-eager", "torch-compile", "fwd-bwd-eager", "fwd-bwd-compile",
                          "floor-fused-update"]
    assert set(VARIANTS) == set(args.modes) | {"graph-no-recompute", "graph-malloc", "graph-saved-trace"}


def test_the_floor_with_a_fused_update_is_the_same_sgd_step_as_torch_optim():
    # Its losses after a few updates follow torch.optim's SGD (momentum, lr x lr_scale per group) on the same model.
    import torch

    from dualmode.apps.bench.variants import BenchSettings, make_batch

    settings = BenchSettings(model="mlp", hidden=16, batch_size=8, backend="aot_eager")
    x, y = make_batch(settings)
    floor, reference = VARIANTS["floor-fused-update"].make(settings), VARIANTS["torch-eager"].make(settings)
    losses = [(floor(x, y), reference(x, y)) for _ in range(4)]
    assert losses[3][1] < losses[0][1]  # the reference did learn, so equal losses mean equal updates
    for a, b in losses:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_options_parse():
    args = parse(["--model", "mobilenet_v2", "--batch-size", "32", "--steps", "12", "--warmup", "2",
                  "--modes", "eager", "graph", "--json", "out.json", "--plot", "out.png", "--backend", "aot_eager",
                  "--compile-mode", "max-autotune", "--cold-cache"])
    assert (args.model, args.batch_size, args.steps, args.warmup) == ("mobilenet_v2", 32, 12, 2)
    assert args.modes == ["eager", "graph"]
    assert (args.json, args.plot, args.backend, args.compile_mode, args.cold_cache) == (
        "out.json", "out.png", "aot_eager", "max-autotune", True)
    assert bench.command_line(args).startswith("dualmode bench --model mobilenet_v2 --batch-size 32 --steps 12")


@pytest.mark.parametrize("argv, culprit", [
    (["--steps", "0"], "--steps: must be at least 1, got 0"),
    (["--batch-size", "many"], "--batch-size: expected an integer, got 'many'"),
    (["--warmup", "-1"], "--warmup: must be at least 0, got -1"),
    (["--burst", "0"], "--burst: must be at least 1, got 0"),
    (["--modes", "eager", "fast"], "--modes: invalid choice: 'fast'"),
    (["--model", "resnet"], "--model: invalid choice: 'resnet'"),
])
def test_bad_options_name_the_option(argv, culprit, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert culprit in capsys.readouterr().err


def test_tiny_run_writes_json_with_every_variant_and_a_plot(tmp_path, capsys):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    assert bench.run(parse(TINY + ["--json", str(out), "--plot", str(plot), "--modes", *VARIANTS])) == 0

    result = json.loads(out.read_text())
    assert result["schema"] == "dualmode-bench/1"
    assert result["command"].startswith("dualmode bench --model mlp --batch-size 8 --steps 2 --warmup 1")
    assert "--modes " + " ".join(VARIANTS) in result["command"]
    assert result["settings"]["backend"] == "aot_eager" and result["settings"]["steps"] == 2
    assert result["settings"]["burst"] == 2
    for key in ("cpu_model", "cores", "usable_cores", "torch", "load_average_before", "load_average_after",
                "foreign_load_timed_rounds"):
        assert key in result["machine"], key
    assert list(result["variants"]) == list(VARIANTS)
    for name, v in result["variants"].items():
        assert "error" not in v, name
        assert len(v["times_ms"]) == 2
        assert v["p10_ms"] <= v["median_ms"] <= v["p90_ms"]
        assert v["samples_per_s"] > 0 and v["speedup_vs_eager"] > 0 and v["first_call_s"] > 0
        assert v["cache_state"] == "none"  # aot_eager does not use inductor's caches
        assert v["memory"]["peak_through_warmup_mb"] is not None
        assert v["memory"]["page_faults_per_step"] >= 0
        # The floor compiles two frames: the model's forward (with its backward) and its update function.
        assert v["compiles"] == (2 if name == "floor-fused-update" else 1 if VARIANTS[name].compiles else 0), name
        assert v["compiles_after_first_call"] == 0, name
    assert result["variants"]["graph"]["trace_s"] > 0
    targets = {t["target"]: t for t in result["targets"]}
    assert targets["compiles in the run == 1"]["met"]
    assert all({"target", "value", "limit", "met", "note"} <= set(t) for t in result["targets"])

    assert plot.read_bytes().startswith(b"\x89PNG")
    table = capsys.readouterr().out
    assert all(name in table for name in VARIANTS)


def test_a_failing_variant_is_reported_by_name(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = TINY + ["--modes", "eager", "graph", "--backend", "no_such_backend", "--json", str(out)]
    assert bench.run(parse(argv)) == 1
    variants = json.loads(out.read_text())["variants"]
    assert "error" not in variants["eager"] and variants["eager"]["median_ms"] > 0
    assert variants["graph"]["error"].startswith("variant 'graph', setup: ")
    assert "no_such_backend" in variants["graph"]["error"]
    assert re.search(r"^graph +FAILED: variant .graph., setup: ", capsys.readouterr().out, re.MULTILINE)


def test_keep_freed_memory_runs_in_every_variant_or_the_variant_fails(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    argv = TINY + ["--modes", "eager", "graph", "--keep-freed-memory", "--json", str(out)]
    from dualmode.step.cpu_memory import CHOSEN_BY_ENVIRONMENT

    for name in CHOSEN_BY_ENVIRONMENT + ("LD_PRELOAD",):
        monkeypatch.delenv(name, raising=False)
    assert bench.run(parse(argv)) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["keep_freed_memory"] is True
    assert result["command"].endswith("--keep-freed-memory")
    assert all("error" not in v for v in result["variants"].values())

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # the workers inherit it: malloc cannot be changed there
    assert bench.run(parse(argv)) == 1
    for name, v in json.loads(out.read_text())["variants"].items():
        assert "--keep-freed-memory: malloc was left as it is" in v["error"], name


def test_the_saved_trace_first_call_target_counts_only_a_loaded_trace():
    from dualmode.apps.bench.report import targets

    graph = {"median_ms": 500.0, "compiles": 1, "compiles_after_first_call": 0, "cache_state": "warm",
             "first_call_s": 4.6}
    loaded = {**graph, "first_call_s": 1.9, "trace_source": "loaded from a saved trace in 0.32 s"}
    found = {t["target"]: t for t in targets("mobilenet_v2", {"graph": graph, "graph-saved-trace": loaded})}
    goal = "first call with a warm cache and the saved trace (config.trace_cache) <= 5.0 s"
    assert found[goal]["value"] == 1.9 and found[goal]["met"]
    saving = {**loaded, "first_call_s": 5.4, "trace_source": "traced; saved for later processes (/c)"}
    assert goal not in {t["target"] for t in targets("mobilenet_v2", {"graph": graph, "graph-saved-trace": saving})}
