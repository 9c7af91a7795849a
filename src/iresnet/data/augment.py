"""The standard CIFAR-10 augmentation (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016), as the i-ResNet paper trains with it: a random crop of the image
zero-padded by ``pad`` pixels on each side, then a horizontal flip with probability 1/2, drawn
from a generator so that a step's batch is a function of the step."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_crop_flip"]


def random_crop_flip(images: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Each image of ``images`` ``(N, C, H, W)`` shifted by ``(dy, dx)`` drawn uniformly from
    ``{-pad, ..., pad}^2`` (pixels moved in from outside are 0) and mirrored left-right with
    probability 1/2; the dtype is kept.

    Example:
        >>> x = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4)
        >>> random_crop_flip(x, 0, torch.Generator().manual_seed(0)).shape
        torch.Size([1, 1, 4, 4])
    """
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be non-negative, got {pad}")
    n, c, h, w = images.shape
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = (top[:, None] + torch.arange(h)).to(images.device)  # (N, H) rows of the padded image
    columns = left[:, None] + torch.arange(w)
    columns = torch.where(flip[:, None], columns.flip(1), columns).to(images.device)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], columns[:, None, None, :]]
