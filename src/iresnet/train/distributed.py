"""``torch.distributed`` set-up from the environment ``torchrun`` provides; one process
without it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Processes", "start_processes"]


@dataclass
class Processes:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: Tensor) -> Tensor:
        """The mean of ``value`` over the processes (itself on one process)."""
        if self.world == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process."""
        if self.world == 1:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(value)
        return bool(value.item() > 0)

    def gather(self, obj: object) -> list[object]:
        """``obj`` from every process, in rank order."""
        if self.world == 1:
            return [obj]
        gathered: list[object] = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def start_processes(device: str) -> Processes:
    """Join the process group that ``torchrun`` describes in ``WORLD_SIZE`` / ``RANK`` /
    ``LOCAL_RANK`` (gloo on CPU, NCCL on CUDA, one GPU per process), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    target = torch.device(device)
    if world == 1:
        return Processes(0, 1, target)
    if target.type == "cuda":
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), target)
