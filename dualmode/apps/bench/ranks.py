"""`dualmode bench` under torchrun: one process group per variant, and the parents agreeing across the ranks.

Each rank's parent joins torchrun's process group (`Launch.from_env`); each variant's workers, one per rank, join
a group of their own through torchrun's store under the prefix `dualmode-bench/<variant>`, so that a variant's
DistributedDataParallel reduces over its own workers only. Every rank runs the same schedule, and after each
phase the parents agree on the variants that failed anywhere: every rank drops them, so that no worker waits in a
collective for a peer that will not come. A worker whose peer died gets gloo's error; one whose peer never joins
or never calls gets the timeout.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch.distributed as dist

from dualmode.apps.bench.machine import usable_cores
from dualmode.apps.launch import Launch

# A worker's collectives wait this long for their peers: long enough for one rank's inductor compile to
# finish after the other's (they compile the same graph at the same time), short enough to end a lost run.
WORKER_TIMEOUT = datetime.timedelta(seconds=300)


def default_threads() -> int:
    """Torch threads per variant: the cores, shared among the ranks that torchrun started on this machine."""
    return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def join_variant_group(variant: str) -> None:
    """In a worker: join the process group of this variant's workers, through the store torchrun runs."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=WORKER_TIMEOUT)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"dualmode-bench/{variant}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=WORKER_TIMEOUT)


def leave_variant_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Ranks:
    """The parents' side: what the ranks tell each other. On one process (no torchrun) every method is trivial."""

    def __init__(self, launch: Launch):
        self.launch = launch
        self.settled: set[str] = set()  # variants whose failure the ranks have agreed on
        self.host_pids: dict[str, list[int]] = {}  # variant -> its workers' pids on this host (parents under "")

    def _gather(self, value) -> list:
        if not self.launch.distributed:
            return [value]
        gathered = [None] * self.launch.world
        dist.all_gather_object(gathered, value)
        return gathered

    def share_pids(self, workers: dict) -> None:
        """Learn the pids of every rank's parent and workers on this host: their CPU time is not foreign load."""
        mine = {"": [os.getpid()], **{name: [w.process.pid] for name, w in workers.items()}}
        host = socket.gethostname()
        for their_host, pids in self._gather((host, mine)):
            if their_host == host:
                for name, found in pids.items():
                    self.host_pids.setdefault(name, []).extend(found)

    def pids(self, names) -> list[int]:
        """The pids on this host of the parents and of the workers of `names`, on every rank."""
        return [pid for name in ("", *names) for pid in self.host_pids.get(name, [])]

    def agree(self, workers: dict, results: dict) -> None:
        """Drop on every rank the variants that failed on any; each error names its rank (under torchrun)."""
        mine = {name: v["error"] for name, v in results.items() if "error" in v and name not in self.settled}
        gathered = self._gather(mine)
        for name in set().union(*gathered):
            if self.launch.distributed:
                results[name]["error"] = "; ".join(f"rank {rank}: {errors[name]}"
                                                   for rank, errors in enumerate(gathered) if name in errors)
            if name in workers:
                workers.pop(name).close()
            self.settled.add(name)

    def compare_checksums(self, results: dict) -> list[str]:
        """Record under each variant every rank's parameter checksum and whether they agree; the names that do not.

        DistributedDataParallel leaves the same parameters on every rank, so the checksums must be equal exactly.
        On one process there is nothing to compare, and nothing is recorded.
        """
        if not self.launch.distributed:
            return []
        mine = {name: v["checksum"] for name, v in results.items() if "checksum" in v}
        gathered = self._gather(mine)
        differ = []
        for name, v in results.items():
            if "checksum" not in v:
                continue
            sums = [checksums.get(name) for checksums in gathered]
            v["rank_checksums"] = sums
            v["ranks_agree"] = all(s == sums[0] for s in sums)
            if not v["ranks_agree"]:
                differ.append(name)
        return differ
