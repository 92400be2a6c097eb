"""Data-parallel training over several processes: torchrun and DistributedDataParallel.

`torchrun` (torch.distributed.run) starts one process per device and tells each its place through
the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...); `setup` joins the process group
from there, with NCCL on GPUs and gloo on CPUs. One process is the whole world when WORLD_SIZE is
unset, and then nothing here communicates.

How the pipeline splits the work: every rank draws the same global batch, timesteps and noise
from the same seeded generator, reads only its own contiguous shard of the batch's images
(pipeline/batches.py) and trains on it, and DDP averages the gradients. A step on N processes
is therefore the step one process takes on the global batch, up to the order of floating-point
sums (and dropout, whose masks each rank draws for itself). Only rank 0 talks to MLflow and
writes files (`is_main`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.device import default_device


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch_size: int) -> slice:
        """This rank's part of a global batch (the config checks that it divides evenly)."""
        per_rank = batch_size // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def agree(self, loss: float, stop: int) -> tuple[float, int]:
        """The loss averaged over the ranks, and the stop signal any rank received, so that all
        of them log the same curve and stop after the same step."""
        if self.size == 1:
            return loss, stop
        mean = torch.tensor([loss / self.size], dtype=torch.float64, device=self.device)
        dist.all_reduce(mean)
        signal = torch.tensor([stop], dtype=torch.int64, device=self.device)
        dist.all_reduce(signal, op=dist.ReduceOp.MAX)
        return float(mean[0]), int(signal[0])

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wait_for_main(self) -> None:
        """Return once every rank, rank 0 too, has called it."""
        if self.size > 1:
            dist.barrier()

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` in rank order on rank 0 (None on the others)."""
        if self.size == 1:
            return [value]
        gathered = [None] * self.size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def torchrun_command(processes: int, module: str) -> list[str]:
    """Start `python -m module` as `processes` ranks on this machine (torchrun --standalone)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", "-m", module]


def setup() -> World:
    """Join the process group that torchrun describes in the environment, if any."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World(device=default_device())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
