"""Checks on the tensors users hand to the layers: clear errors instead of wrong answers."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_input"]


def check_input(
    x: Tensor,
    name: str,
    event_shape: tuple[int, ...] | None,
    dtype: torch.dtype | None,
) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating tensor of shape ``(batch, *event_shape)``
    and dtype ``dtype`` (where given) holding only finite numbers."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(
            f"{name}: expected dtype {dtype} (the dtype of the parameters), got {x.dtype}; "
            f"convert the input or the module with .to({dtype})"
        )
    if x.dim() < 2:
        raise ValueError(f"{name}: expected a batch of shape (batch, ...), got shape {tuple(x.shape)}")
    if event_shape is not None and tuple(x.shape[1:]) != tuple(event_shape):
        raise ValueError(f"{name}: expected shape (batch, {', '.join(map(str, event_shape))}), got {tuple(x.shape)}")
    if torch.compiler.is_compiling():  # checked on the device: no graph break, no wait for the host
        torch._assert_async(torch.isfinite(x).all(), f"{name}: the input holds NaN or inf")
        return
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise ValueError(f"{name}: {bad} of {x.shape[0]} samples hold NaN or inf")
