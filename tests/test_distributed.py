"""Data parallel: 2 processes (gloo on 127.0.0.1) against 1 process on the whole global batch, in both modes.

The ranks are plain Python processes started here with the environment torchrun gives them
(tests/distributed_worker.py); every process group and every subprocess has a timeout, so nothing hangs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

import distributed_worker as worker
import dualmode as dm

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
ROOT = os.path.dirname(os.path.dirname(WORKER))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, out_dir, world: int = 2, timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """Start `world` ranks of the worker; wait for all of them (each under `timeout`)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, WORKER, scenario, str(out_dir)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    for rank, proc in enumerate(run_ranks("parity", out)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{proc.stderr[-3000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_two_ranks_match_one_process_on_the_global_batch(parity, mode):
    reference = worker.state(worker.train(worker.make_step(worker.net(), "eager")).model)
    start = worker.state(worker.net())
    assert max_diff(reference, start) > 1e-2  # the reference trained
    for rank in range(2):
        assert max_diff(parity[rank][mode], reference) < 1e-5, f"rank {rank}, {mode} mode"
    for k in reference:
        assert torch.equal(parity[0][mode][k], parity[1][mode][k]), f"{k} differs between the ranks in {mode} mode"


def test_graph_mode_reduces_inside_the_graph_and_syncs_buffers_as_ddp(parity):
    explain = parity[0]["explain"]
    # apply: the finite flag and one gradient bucket; accumulate: the finite flag only
    assert "collectives in the graph: 2 all_reduce over 2 ranks; gradients in 1 buckets of at most 25 MiB" in explain
    assert "collectives in the graph: 1 all_reduce over 2 ranks; gradients summed here" in explain
    for rank in range(2):  # BatchNorm: DDP's eager run broadcasts rank 0's buffers; graph mode does the same
        eager, graph = parity[rank]["bn_eager"], parity[rank]["bn_graph"]
        assert max_diff(eager, graph) < 1e-5, f"rank {rank}"
        assert torch.equal(eager["bn.num_batches_tracked"], graph["bn.num_batches_tracked"])


def test_parameters_that_differ_and_a_failing_rank_stop_every_rank(tmp_path):
    procs = run_ranks("faults", tmp_path, timeout=120)
    for rank, proc in enumerate(procs):
        assert proc.returncode != 0, f"rank {rank} ran on:\n{proc.stdout}"
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert "parameter 'model.module.fc2.bias' differs between the ranks" in saved["differ"]
    assert "ValueError: rank 1 fails on purpose" in procs[1].stderr
    assert "Connection closed by peer" in procs[0].stderr  # rank 0: gloo names the lost peer


class Embed(dm.TrainGraph):
    def __init__(self):
        super().__init__(config=dm.StepConfig(compile_options=dict(worker.FAST)))
        self.embed = nn.Embedding(4, 2)
        self.add_optimizer(torch.optim.SGD(self.embed.parameters(), lr=0.1))

    def build(self, i):
        loss = self.embed(i).sum()
        loss.backward()
        return loss


def test_an_error_while_the_compiled_step_runs_is_the_real_error():
    # Found with a lost peer: torch.compile(gm) hid any runtime error behind dynamo's "Attempt to trace generator".
    step = Embed()
    step(torch.tensor([0, 3]))
    with pytest.raises(IndexError, match="index out of range"):
        step(torch.tensor([0, 9]))
