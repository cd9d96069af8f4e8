"""Data parallel: 2 processes (gloo on 127.0.0.1) against 1 process on the whole global batch, in both modes.

The ranks are plain Python processes started here with the environment torchrun gives them
(tests/distributed/worker.py); every process group and every subprocess has a timeout, so nothing hangs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import dualmode as dm
from dualmode.apps.launch import Launch
from tests.distributed import worker

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(WORKER)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out_dir, world: int = 2, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start `world` ranks of the worker; wait for all of them, `timeout` seconds at most in all."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, WORKER, str(out_dir)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline, done = time.monotonic() + timeout, []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:  # on a timeout: the ranks still running
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return done


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One run of 2 ranks: (their processes, the results each saved before rank 1 failed on purpose)."""
    out = tmp_path_factory.mktemp("ranks")
    procs = run_ranks(out)
    for rank, proc in enumerate(procs):
        assert (out / f"rank{rank}.pt").exists(), f"rank {rank} saved nothing:\n{proc.stderr[-3000:]}"
    return procs, [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def parity(ranks):
    return ranks[1]


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_two_ranks_match_one_process_on_the_global_batch(parity, mode):
    reference = worker.state(worker.train(worker.make_step(worker.net(), "eager")).model)
    start = worker.state(worker.net())
    assert max_diff(reference, start) > 1e-2  # the reference trained
    for rank in range(2):
        diff = max_diff(parity[rank][mode], reference)
        print(f"{mode} mode, rank {rank}: max |2 processes - 1 process| = {diff:.1e}")  # pytest -s shows it
        assert diff < 1e-5, f"rank {rank}, {mode} mode"
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


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_a_loss_not_finite_on_one_rank_skips_the_update_on_every_rank(parity, mode):
    for rank in range(2):
        got = parity[rank][f"nan_{mode}"]
        if rank == 1:
            assert "the loss is nan" in got["error"], got["error"]
        assert "the loss or a gradient on rank 1" in got["error"], f"rank {rank}: {got['error']}"
        assert got["kept"] and got["steps"] == 3, f"rank {rank} updated"


def test_parameters_that_differ_between_ranks_raise_on_every_rank(parity):
    for rank in range(2):
        assert "parameter 'model.module.fc2.bias' differs between the ranks" in parity[rank]["differ"]


def test_a_failing_rank_stops_every_rank_with_an_error(ranks):
    procs, _ = ranks
    assert [p.returncode != 0 for p in procs] == [True, True]
    assert "ValueError: rank 1 fails on purpose" in procs[1].stderr
    assert "Connection closed by peer" in procs[0].stderr  # rank 0, in the compiled all-reduce: gloo names it


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


def test_each_rank_loads_its_own_shard_of_every_global_batch():
    data = torch.utils.data.TensorDataset(torch.arange(40))
    seen = []
    for rank in range(2):
        loader = Launch(rank, 2, distributed=True).loader(data, 8, drop_last=True, seed=0)
        batches = [b for (b,) in loader]
        assert [len(b) for b in batches] == [4] * 5  # the global batch of 8, split in two
        seen.append(torch.cat(batches))
    assert sorted(torch.cat(seen).tolist()) == list(range(40))  # disjoint shards that cover the data
    with pytest.raises(ValueError, match="--batch-size 9 is the global batch and must divide evenly over the 2"):
        Launch(0, 2, distributed=True).shard_size(9)


def test_tutorial_under_torchrun_splits_the_global_batch_and_only_rank_0_prints():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "dualmode", "tutorial", "--mode", "eager", "--max-steps", "1", "--width-mult",
                           "0.25", "--bn-batches", "0", "--batch-size", "32"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (torchrun), 16 images of each batch per process" in done.stdout
    assert done.stdout.count("=== summary ===") == 1 and done.stdout.count("Epoch 1") == 1
