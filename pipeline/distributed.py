"""Running under torchrun: which rank this process is, and the few collectives kdpipe uses.

kdpipe never launches processes itself. `torchrun --nproc-per-node N kdpipe ...` starts
N copies of the command; each joins the process group here (NCCL on GPUs, gloo on the
CPU) and works on its share. Without torchrun the same code runs as rank 0 of 1.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .errors import ConfigError

# Ranks wait for each other at the end of a cache-teacher run while the slowest finishes
# its shards: allow far more than gloo's and NCCL's default of 10 to 30 minutes.
TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 logs, saves and writes what must be written once."""
        return self.rank == 0

    def part(self, count: int) -> slice:
        """This rank's contiguous part of `count` items (the first count % world ranks get one more)."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


def launched() -> bool:
    """True when torchrun (or another torch.distributed launcher) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> Ranks:
    """Join the job's process group when launched by torchrun; a no-op otherwise."""
    if not launched():
        return Ranks()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    return ranks()


@contextmanager
def job() -> Iterator[Ranks]:
    """The process group for one command: joined on entry when under torchrun, left on exit."""
    try:
        yield init()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def ranks() -> Ranks:
    """This process's ranks: those of the process group, or rank 0 of 1 outside one."""
    if not dist.is_initialized():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device() -> torch.device:
    """The device this rank computes on: its own GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", ranks().local_rank)
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj`, on every rank (picklable objects)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across(values: dict[str, float], on: torch.device) -> dict[str, float]:
    """Each value summed over all ranks."""
    if not dist.is_initialized() or not values:
        return values
    names = sorted(values)
    total = torch.tensor([values[n] for n in names], dtype=torch.float64, device=on)
    dist.all_reduce(total)
    return dict(zip(names, total.tolist()))


def check_batches(batch_size: int, num_samples: int, world: int) -> None:
    """Every global batch must give each rank at least one sample."""
    last = num_samples % batch_size
    if world > 1 and (batch_size < world or 0 < last < world):
        smallest = last if 0 < last < world else batch_size
        raise ConfigError(
            f"with {world} ranks every batch needs at least {world} samples, but one has {smallest}; "
            "choose a --batch-size that leaves no smaller remainder"
        )
