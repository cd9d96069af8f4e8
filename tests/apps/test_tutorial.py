"""`dualmode tutorial` and the two example scripts that follow OneFlow's tutorial line by line.

The runs are short (1-3 steps, width 0.25, graph mode compiled with the `eager` backend, BatchNorm statistics
re-estimated on one batch), so that the file takes about a minute; the defaults (inductor, full width, three
epochs) are measured in docs/tutorial.md.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from dualmode.apps import cli
from dualmode.apps.tutorial.evaluate import recalibrate_batchnorm
from dualmode.apps.tutorial.progress import Console
from dualmode.apps.tutorial.report import summary_table
from dualmode.apps.tutorial.train import (
    GRAPH_LR_SCALES,
    ModeResult,
    adjust_learning_rate,
    resolve_groups,
    tutorial_model,
    tutorial_rules,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = ["--max-steps", "3", "--batch-size", "32", "--width-mult", "0.25", "--backend", "eager", "--bn-batches", "1"]
EMPTY_GROUP_WARNING = "UserWarning: rule 1 (module 'adaptive_avg_pool2d') selects no parameter"
LOSS_LINE = re.compile(r"^loss: +\d+\.\d{6}  \[ +0/ +1437\]$", re.MULTILINE)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`dualmode.apps.cli.main(argv)` in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def both_modes(tmp_path_factory):
    """One short `--mode both` run shared by the tests that read its output (the compile is the slow part)."""
    plot = tmp_path_factory.mktemp("plot") / "loss.png"
    code, out, err = run_cli("tutorial", "--mode", "both", *QUICK, "--plot", str(plot))
    return code, out, err, plot


# The command line ----------------------------------------------------------------------------------------------

def test_help_lists_the_options():
    code, out, _ = run_cli("tutorial", "--help")
    assert code == 0
    for option in ("--mode", "--data", "--epochs", "--max-steps", "--batch-size", "--plot", "--lr", "--momentum",
                   "--width-mult", "--decay-every", "--backend", "--seed", "--checkpoint", "--checkpoint-every",
                   "--keep-freed-memory", "--trace-cache"):
        assert option in out


@pytest.mark.parametrize("option, value, message", [
    ("--mode", "fast", "invalid choice"),
    ("--lr", "0", "must be above 0"),
    ("--lr", "nan", "expected a finite number"),
    ("--momentum", "1", "must be below 1"),
    ("--epochs", "0", "must be at least 1"),
    ("--batch-size", "many", "expected an integer"),
    ("--width-mult", "-0.5", "must be above 0"),
])
def test_bad_option_values_name_the_option(option, value, message):
    code, _, err = run_cli("tutorial", option, value)
    assert code == 2
    assert f"argument {option}: {message}" in err


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/dir"], "--data /no/such/dir: CIFAR-10 not found"),
    (["--plot", "/no/such/dir/loss.png"], "--plot /no/such/dir/loss.png: the folder /no/such/dir does not exist"),
    (["--backend", "no_such_backend"], "--backend 'no_such_backend' is not a torch.compile backend"),
    (["--mode", "graph", "--batch-size", "5000"], "--batch-size 5000 is larger than the 1437 training images"),
])
def test_bad_input_is_named_before_anything_trains(argv, message):
    start = time.perf_counter()
    code, out, err = run_cli("tutorial", *argv)
    assert code == 2
    assert message in err
    assert "Epoch 1" not in out
    assert time.perf_counter() - start < 20


def test_keep_freed_memory_is_refused_before_training_where_it_cannot_be_done(monkeypatch):
    from dualmode.step import cpu_memory

    monkeypatch.setattr(cpu_memory, "_applied", False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # the environment chose
    with pytest.warns(RuntimeWarning, match="malloc left as it is: the environment sets MALLOC_TRIM_THRESHOLD_"):
        code, out, err = run_cli("tutorial", "--mode", "eager", *QUICK, "--keep-freed-memory")
    assert code == 2
    assert "--keep-freed-memory: malloc was left as it is" in err
    assert "Epoch 1" not in out


def test_keep_freed_memory_is_said_in_the_header(monkeypatch):
    from dualmode.step import cpu_memory

    for name in cpu_memory.CHOSEN_BY_ENVIRONMENT + ("LD_PRELOAD",):
        monkeypatch.delenv(name, raising=False)
    code, out, _ = run_cli("tutorial", "--mode", "eager", *QUICK, "--keep-freed-memory")
    assert code == 0
    assert "; freed memory kept (dm.keep_freed_memory)" in out.splitlines()[2]
    assert cpu_memory._applied


# A short run in both modes -------------------------------------------------------------------------------------

def test_both_modes_run(both_modes):
    code, out, _, _ = both_modes
    assert code == 0
    assert out.index("=== eager mode ===") < out.index("=== graph mode ===") < out.index("=== summary ===")


def test_each_mode_prints_the_tutorials_loss_lines_and_an_accuracy(both_modes):
    _, out, _, _ = both_modes
    eager, graph = out.split("=== graph mode ===")
    for part, mode in ((eager, "eager"), (graph, "graph")):
        assert "Epoch 1\n-------------------------------" in part
        assert len(LOSS_LINE.findall(part)) == 1  # batch 0 of 3 steps: the tutorial prints every 5th batch
        assert re.search(rf"held-out accuracy \({mode} mode\): \d+\.\d % of 360 images, with BatchNorm statistics "
                         r"re-estimated on 32 training images \(\d+\.\d % with the running statistics", part)


def test_the_empty_pool_group_warning_is_shown_in_each_mode(both_modes):
    _, out, _, _ = both_modes
    assert out.count(EMPTY_GROUP_WARNING) == 2


def test_the_groups_follow_the_tutorial(both_modes):
    _, out, _, _ = both_modes
    eager, graph = out.split("=== graph mode ===")
    assert "lr decay every 10 batches: features x0.9, adaptive_avg_pool2d x0.8, classifier x0.7" in eager
    assert re.search(r"^0 +0 +156 .* 0\.1 +1 +0\.1 ", eager, re.MULTILINE)       # features: lr, lr_scale 1
    assert re.search(r"^2 +2 +2 .* 0\.001 +1 +0\.001 ", eager, re.MULTILINE)    # classifier: lr / 100
    assert re.search(r"^0 +0 +156 .* 0\.1 +0\.9 +0\.09 ", graph, re.MULTILINE)   # features: lr_scale 0.9
    assert re.search(r"^2 +2 +2 .* 0\.1 +0\.7 +0\.07 ", graph, re.MULTILINE)     # classifier: lr_scale 0.7


def test_graph_mode_says_it_compiles_and_compiles_once(both_modes):
    _, out, _, _ = both_modes
    assert "graph mode: first call: tracing forward + backward + update and compiling" in out
    assert re.search(r"graph mode: first call \(trace \+ compile \+ one step\) took \d+\.\d s", out)
    assert re.search(r"^compiles +0 +1$", out, re.MULTILINE)


def test_the_summary_has_a_column_per_mode(both_modes):
    _, out, _, _ = both_modes
    summary = out.split("=== summary ===")[1]
    assert re.search(r"^ +eager +graph$", summary, re.MULTILINE)
    for row in ("final loss", "mean loss, all steps", "held-out accuracy", "samples/s after the first call",
                "first call (s)"):
        assert re.search(rf"^{re.escape(row)} +\S+ +\S+", summary, re.MULTILINE), row


def test_the_plot_is_a_small_png(both_modes):
    _, out, _, plot = both_modes
    assert f"loss plot written to {plot}" in out
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) < 200_000


# The pieces ----------------------------------------------------------------------------------------------------

def test_the_classifier_is_replaced_as_the_tutorial_meant():
    torch.manual_seed(0)
    model = tutorial_model(num_classes=10, width_mult=0.25)
    assert not hasattr(model, "classifer")
    assert [type(m).__name__ for m in model.classifier] == ["Dropout", "Linear"]
    assert model.classifier[1].in_features == model.last_channel and model.classifier[1].out_features == 10
    assert model.classifier[0].p == 0.2


def test_the_eager_decay_multiplies_each_lr_by_its_own_factor():
    model = tutorial_model(num_classes=10, width_mult=0.25)
    said = []
    groups = resolve_groups(tutorial_rules(model, "eager", 1e-3), model, said.append)
    optimizer = torch.optim.SGD(groups)
    adjust_learning_rate(optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * 0.9, 1e-4 * 0.8, 1e-5 * 0.7])
    assert [g["lr_scale"] for g in optimizer.param_groups] == [1.0, 1.0, 1.0]
    assert len(said) == 1 and said[0].startswith(EMPTY_GROUP_WARNING)


def test_the_graph_groups_carry_the_tutorials_lr_scale():
    model = tutorial_model(num_classes=10, width_mult=0.25)
    groups = resolve_groups(tutorial_rules(model, "graph", 1e-3), model, lambda text: None)
    assert tuple(g["lr_scale"] for g in groups) == GRAPH_LR_SCALES
    assert [len(g["params"]) for g in groups][1] == 0
    assert all("lr" not in g for g in groups)  # the optimizer's lr is the base


def test_the_compile_ticker_shows_progress_without_a_terminal():
    out, err = io.StringIO(), io.StringIO()
    console = Console(out=out, err=err, tick_every=0.01, quiet_every=0.05)
    with console.compiling("inductor"):
        time.sleep(0.3)
    assert out.getvalue().startswith("graph mode: first call: tracing")
    assert "took 0." in out.getvalue()
    assert "still compiling" in err.getvalue()


def test_the_summary_table_aligns_modes_and_leaves_gaps_for_missing_values():
    eager = ModeResult("eager", losses=[2.5, 2.0], step_seconds=[1.0, 0.5], batch_sizes=[64, 64], accuracy=0.5)
    graph = ModeResult("graph", losses=[2.4], step_seconds=[90.0], batch_sizes=[64], compiles=1, trace_seconds=8.0)
    lines = summary_table([eager, graph]).splitlines()
    assert len({len(line) for line in lines}) == 1
    rows = {line.split("  ")[0].strip(): line.split()[-2:] for line in lines[1:]}
    assert rows["held-out accuracy"] == ["%", "-"] and "50.0" in lines[5]
    assert rows["samples/s after the first call"] == ["128.0", "-"]
    assert rows["compiles"] == ["0", "1"]


# The example scripts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script, extra", [
    ("oneflow_tutorial_eager.py", []),
    ("oneflow_tutorial_graph.py", ["--backend", "eager"]),
])
def test_the_example_scripts_run_briefly(script, extra):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), "--max-steps", "1",
                           "--width-mult", "0.25", *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "Using cpu device" in done.stdout
    assert len(LOSS_LINE.findall(done.stdout)) == 1
    assert "selects no parameter" in done.stderr  # the resolver's UserWarning, shown as Python shows warnings


def test_batchnorm_statistics_are_re_estimated_from_the_chosen_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    images = torch.randn(12, 3, 5, 5) * 3 + 1
    data = torch.utils.data.TensorDataset(images, torch.zeros(12, dtype=torch.long))
    seen = recalibrate_batchnorm(model, data, batches=1, batch_size=12, seed=0)
    assert seen == 12
    with torch.no_grad():
        features = model[0](images)
    torch.testing.assert_close(model[1].running_mean, features.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model[1].running_var, features.var(dim=(0, 2, 3)))
    assert model[1].momentum == 0.1 and model.training


def test_a_restarted_run_with_trace_cache_loads_the_traced_step(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    said = []
    for _ in range(2):
        code, out, err = run_cli("tutorial", "--mode", "graph", *QUICK, "--max-steps", "1", "--trace-cache")
        assert code == 0, err
        said.append(next(line for line in out.splitlines() if line.startswith("graph mode: trace: ")))
    assert said[0] == f"graph mode: trace: traced; saved for later processes ({tmp_path}/dualmode/traces)"
    assert said[1].startswith("graph mode: trace: loaded from a saved trace in ")
