"""Running a command under `torchrun`: the process group, the DDP wrapper, each rank's shard, rank 0's output.

`torchrun --nproc_per_node N -m dualmode tutorial ...` starts N processes with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set; without them a command runs as the single process it always was.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

# Long enough for rank 0's evaluation and plotting while the others wait at the next collective.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Launch:
    """Where this process stands: its rank among `world` processes; `distributed` under torchrun."""

    rank: int = 0
    world: int = 1
    distributed: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, plots and writes."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Launch:
        """Join the process group torchrun describes (gloo on CPU, NCCL when every rank has a GPU)."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return cls(dist.get_rank(), dist.get_world_size(), True)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # leaves the process group however the command ended

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model in DistributedDataParallel under torchrun (which broadcasts rank 0's weights), else itself."""
        return nn.parallel.DistributedDataParallel(model) if self.distributed else model

    def shard_size(self, global_batch: int) -> int:
        """Each rank's share of a global batch; ValueError unless it divides evenly."""
        if global_batch % self.world:
            raise ValueError(f"--batch-size {global_batch} is the global batch and must divide evenly over the "
                             f"{self.world} processes")
        return global_batch // self.world

    def loader(self, data, global_batch: int, *, drop_last: bool, seed: int) -> DataLoader:
        """Shuffled batches of this rank's shard: a DistributedSampler under torchrun (`set_epoch` each epoch)."""
        if not self.distributed:
            return DataLoader(data, global_batch, shuffle=True, drop_last=drop_last,
                              generator=torch.Generator().manual_seed(seed))
        sampler = DistributedSampler(data, self.world, self.rank, shuffle=True, seed=seed, drop_last=True)
        return DataLoader(data, self.shard_size(global_batch), sampler=sampler, drop_last=drop_last)

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (the loss of the global batch from each rank's shard)."""
        if not self.distributed:
            return value
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t) / self.world
