"""`dualmode bench` under torchrun: 2 ranks (gloo on 127.0.0.1) train every variant on their halves of the global
batch and end where 1 process on the whole batch ends; rank 0 alone prints and writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dualmode.apps.bench.ranks import Ranks
from dualmode.apps.bench.variants import VARIANTS, BenchSettings, make_batch
from dualmode.apps.bench.worker import checksum
from dualmode.apps.launch import Launch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--model", "mlp", "--hidden", "32", "--steps", "2", "--warmup", "0", "--modes", "eager", "torch-eager",
        "graph", "torch-compile", "--backend", "aot_eager"]
STEPS = 3  # the first call, then 2 timed steps


def torchrun(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "dualmode", "bench", *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def close(a: dict, b: dict, rel: float = 1e-6) -> bool:
    """Two parameter checksums agree to `rel` of the parameters' size (their sum may be near 0)."""
    return (abs(a["sum"] - b["sum"]) <= rel * a["sum_abs"] and abs(a["sum_abs"] - b["sum_abs"]) <= rel * a["sum_abs"]
            and abs(a["sum_sq"] - b["sum_sq"]) <= rel * a["sum_sq"])


def trained(batch_size: int, steps: int = STEPS) -> dict:
    """The checksum of plain PyTorch's training (torch-eager) on `batch_size` samples of the global batch, here."""
    settings = BenchSettings(model="mlp", hidden=32, batch_size=batch_size, backend="aot_eager")
    step = VARIANTS["torch-eager"].make(settings)
    x, y = make_batch(settings)
    for _ in range(steps):
        step(x, y)
    return checksum(step.model)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = torchrun(*ARGS, "--batch-size", "16", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads(out.read_text())


def test_rank_0_alone_prints_the_table_and_writes_the_json(two_ranks):
    done, result = two_ranks
    assert done.stdout.count("median ms") == 1  # the table's header
    assert done.stdout.count("mlp, batch 16 (8 per rank on 2 ranks)") == 1
    assert done.stderr.count("bench: round 2/2") == 1
    settings = result["settings"]
    assert (settings["distributed"], settings["world_size"], settings["per_rank_batch"]) == (True, 2, 8)
    assert result["command"].startswith("torchrun --nproc_per_node 2 -m dualmode bench --model mlp --batch-size 16")
    for name, v in result["variants"].items():
        assert "error" not in v, v["error"]
        assert v["samples_per_s"] == pytest.approx(16 / (v["median_ms"] / 1000)), name  # the global batch


def test_every_variant_ends_with_the_same_parameters_on_both_ranks(two_ranks):
    _, result = two_ranks
    for name, v in result["variants"].items():
        assert len(v["rank_checksums"]) == 2 and v["ranks_agree"], name
        assert v["rank_checksums"][0] == v["rank_checksums"][1] == v["checksum"], name


def test_two_ranks_train_as_one_process_on_the_global_batch(two_ranks):
    _, result = two_ranks
    reference, untrained, one_shard = trained(16), trained(16, steps=0), trained(8)
    assert not close(reference, untrained) and not close(reference, one_shard)  # the check can fail
    for name in ("eager", "torch-eager", "graph", "torch-compile"):
        assert close(result["variants"][name]["checksum"], reference), name
    assert close(result["variants"]["graph"]["checksum"], result["variants"]["eager"]["checksum"])


def test_the_compiled_variants_compile_their_step_under_ddp(two_ranks):
    # torch.compile(DDP(model)) would break the graph in DDP's forward and compile nothing: the bench compiles inside
    variants = two_ranks[1]["variants"]
    assert (variants["torch-compile"]["compiles"], variants["torch-compile"]["graph_breaks"]) == (1, 0)
    assert variants["graph"]["compiles"] == 1


def test_a_global_batch_that_does_not_divide_over_the_ranks_is_refused():
    done = torchrun(*ARGS, "--batch-size", "15")
    assert done.returncode != 0
    assert "--batch-size 15 is the global batch and must divide evenly over the 2 processes" in done.stderr
    assert done.stderr.count("must divide evenly") == 1  # said once, by rank 0
    assert "median ms" not in done.stdout


class FakeWorker:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def test_a_variant_that_fails_on_another_rank_is_dropped_here_and_its_error_names_the_rank():
    ranks = Ranks(Launch(0, 2, distributed=True))
    ranks._gather = lambda mine: [mine, {"graph": "RuntimeError: boom"}]  # rank 1's report
    workers = {"eager": FakeWorker(), "graph": FakeWorker()}
    graph = workers["graph"]
    results = {"eager": {}, "graph": {"first_call_s": 1.0}}
    ranks.agree(workers, results)
    assert list(workers) == ["eager"] and graph.closed
    assert results["graph"]["error"] == "rank 1: RuntimeError: boom"
    assert "error" not in results["eager"]
    ranks._gather = lambda mine: [mine, {}]
    ranks.agree(workers, results)  # an agreed failure is not reported again
    assert results["graph"]["error"] == "rank 1: RuntimeError: boom"


def test_parameters_that_differ_between_the_ranks_are_marked():
    ranks = Ranks(Launch(0, 2, distributed=True))
    same, other = {"sum": 1.0, "sum_abs": 2.0, "sum_sq": 3.0}, {"sum": 1.0, "sum_abs": 2.0, "sum_sq": 3.5}
    ranks._gather = lambda mine: [mine, {"eager": same, "graph": other}]
    results = {"eager": {"checksum": same}, "graph": {"checksum": same}}
    assert ranks.compare_checksums(results) == ["graph"]
    assert results["eager"]["ranks_agree"] and not results["graph"]["ranks_agree"]
    assert results["graph"]["rank_checksums"] == [same, other]
