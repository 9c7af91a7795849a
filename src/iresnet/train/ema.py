"""An exponential moving average of a model's parameters, for evaluation."""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import Tensor, nn

__all__ = ["EMAState", "ExponentialMovingAverage"]


class EMAState(TypedDict):
    """What :meth:`ExponentialMovingAverage.state_dict` gives and ``load_state_dict`` takes."""

    decay: float
    updates: int
    shadow: dict[str, Tensor]


class ExponentialMovingAverage:
    r""":math:`\bar\theta \leftarrow d_t \bar\theta + (1 - d_t) \theta` after every step with
    :math:`d_t = \min(d, (1 + t) / (10 + t))`, so that early averages are not dominated by the
    initial weights. Buffers are not averaged: :meth:`copy_to` takes the live model's."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name])

    def state_dict(self) -> EMAState:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: EMAState) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
