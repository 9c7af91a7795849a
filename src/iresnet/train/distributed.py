"""``torch.distributed`` set-up from the environment ``torchrun`` provides; one process
without it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DEVICE_CHOICES", "Processes", "process_device", "resolve_device", "start_processes"]

DEVICE_CHOICES = "auto (CUDA when a GPU is available, else the CPU), cpu, cuda, cuda:N"

_T = TypeVar("_T")


def resolve_device(name: str | torch.device) -> torch.device:
    """The device ``name`` stands for: ``"auto"`` is the first CUDA GPU where one is available and
    the CPU otherwise; ``"cpu"``; ``"cuda"`` or ``"cuda:N"``, which need that GPU. Anything else,
    and CUDA where there is none, raises ``ValueError`` saying what to choose instead.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    text = str(name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "gpu":
        raise ValueError(f"device 'gpu': a GPU is 'cuda' here (or 'auto'); choose {DEVICE_CHOICES}")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"unknown device {text!r}; choose {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device {text!r} is not supported; choose {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {text!r}: no CUDA GPU is available (torch.cuda.is_available() is False); "
            "use --device cpu, or --device auto to take a GPU where there is one"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {text!r}: there is no such GPU, this machine has {torch.cuda.device_count()}")
    return device


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

    def gather(self, obj: _T) -> list[_T]:
        """``obj`` from every process, in rank order."""
        if self.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world  # filled with every process's obj
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def process_device(device: str) -> torch.device:
    """This process's device: :func:`resolve_device`'s alone; under ``torchrun`` on CUDA, GPU
    ``LOCAL_RANK``, and for ``"auto"`` the CPU unless every process on the machine has a GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "cpu"
    target = resolve_device(device)
    if target.type != "cuda":
        return target
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"{local_world} processes on this machine need a GPU each, and it has {torch.cuda.device_count()}: "
            "start fewer processes per machine, or use --device cpu"
        )
    return torch.device("cuda", local_rank)


def start_processes(device: str) -> Processes:
    """Join the process group that ``torchrun`` describes in ``WORLD_SIZE`` / ``RANK`` /
    ``LOCAL_RANK`` (gloo on CPU, NCCL on CUDA, one GPU per process), or run alone; ``device`` as
    :func:`resolve_device` reads it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    target = process_device(device)
    if world == 1:
        return Processes(0, 1, target)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), target)
