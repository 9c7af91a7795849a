"""Measuring the memory an autograd graph holds, on any device."""

from __future__ import annotations

from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks

__all__ = ["SavedTensorMeter"]


class _Saved:
    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: SavedTensorMeter, key: tuple, tensor: Tensor) -> None:
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self) -> None:
        self.meter._release(self.key)


class SavedTensorMeter(saved_tensors_hooks):
    """Counts the bytes of the storages that autograd saves for backward while the context is
    active: ``current`` (still held by a live graph) and ``peak``. A storage saved by several
    nodes counts once. Unlike allocator statistics this works on the CPU too and isolates
    the graph from everything else.

    Example:
        >>> import torch
        >>> w = torch.randn(100, 100, requires_grad=True)
        >>> with SavedTensorMeter() as meter:
        ...     y = (w @ w).tanh().sum()
        >>> meter.current > 0
        True
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._live: dict[tuple, list[int]] = {}
        super().__init__(self._pack, lambda saved: saved.tensor)

    def __enter__(self) -> SavedTensorMeter:  # type: ignore[override]  # torch types the base's as returning None
        super().__enter__()
        return self

    def _pack(self, tensor: Tensor) -> _Saved:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), str(tensor.device))
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        return _Saved(self, key, tensor.detach())  # a saved output must not keep its own graph alive

    def _release(self, key: tuple) -> None:
        entry = self._live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]
