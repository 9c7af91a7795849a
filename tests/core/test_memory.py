"""SavedTensorMeter counts what the autograd graph holds, and lets it go."""

from __future__ import annotations

import gc

import torch

from iresnet.core.memory import SavedTensorMeter


def test_counts_saved_storages_once_and_releases_them(device):
    w = torch.randn(100, 100, device=device, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = (w * w).sum()  # w is saved twice by mul, counted once
    assert meter.current == 100 * 100 * 4
    y.backward()
    assert meter.current == 0 and meter.peak == 100 * 100 * 4


def test_graph_never_run_backward_is_freed(device):
    w = torch.randn(1000, 1000, device=device, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = torch.sigmoid(w)  # saves its own output
    assert meter.current == 1000 * 1000 * 4
    del y
    gc.collect()
    assert meter.current == 0
