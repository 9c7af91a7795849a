"""The optimiser of a run and its learning-rate schedule: a linear warm-up, then a factor
``lr_gamma`` at every milestone."""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["optimizer", "schedule", "set_lr"]


def optimizer(config: TrainConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """``config.optimizer`` over ``model``'s parameters ("sgd" with momentum 0.9), and its scheduler."""
    if config.optimizer == "sgd":
        chosen = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    else:
        kind = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}[config.optimizer]
        chosen = kind(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return chosen, torch.optim.lr_scheduler.LambdaLR(chosen, schedule(config))


def schedule(config: TrainConfig) -> Callable[[int], float]:
    """The learning-rate factor of a step: a linear warm-up, times ``lr_gamma`` for every
    milestone passed."""

    def factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        return warmup * config.lr_gamma ** bisect.bisect_right(config.lr_milestones, step)

    return factor


def set_lr(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, config: TrainConfig, step: int
) -> None:
    """``config.lr`` for a resumed run at ``step``: the schedule's factor at this step times it."""
    factor = schedule(config)(step)
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = config.lr, config.lr * factor
    scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
