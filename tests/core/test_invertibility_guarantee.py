"""Invertibility survives adversarial training: Adam with a large learning rate on an objective
that pushes Lip(g) up must never lift a block's certified Lipschitz bound to 1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import iresnet
from helpers import conv_branch, dense_branch


def dense_model(coeff: float) -> iresnet.Sequential:
    return iresnet.Sequential(*[iresnet.ResidualBlock(dense_branch(4, 32, coeff, depth=3), None) for _ in range(3)])


def conv_model(coeff: float) -> iresnet.Sequential:
    return iresnet.Sequential(*[iresnet.ResidualBlock(conv_branch(2, 8, coeff, nn.ELU), None) for _ in range(2)])


def lipschitz_ratio(g: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean of |g(a) - g(b)|^2 / |a - b|^2 over close pairs: maximising it drives Lip(g) up."""
    delta = 1e-2 * torch.randn_like(x)
    diff = (g(x + delta) - g(x)).flatten(1)
    return (diff.pow(2).sum(1) / delta.flatten(1).pow(2).sum(1)).mean()


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_adversarial_training_keeps_blocks_invertible(device, kind):
    torch.manual_seed(0)
    model = (dense_model(0.97) if kind == "dense" else conv_model(0.97)).to(device)
    shape = (4,) if kind == "dense" else (2, 6, 6)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    worst = 0.0
    for step in range(300):
        x = torch.randn(32, *shape, device=device)
        loss = -sum(lipschitz_ratio(block.g, x) for block in model)
        optimizer.zero_grad()
        loss.backward()
        if step % 10 == 0 or step == 299:
            # the vectors were just updated by this forward pass: the eval-mode reading of each
            # weight is the weight this training step used, so this certifies the trained map
            worst = max(worst, *(iresnet.lipschitz_bound(block.g, shape) for block in model))
        optimizer.step()
    assert 0.85 < worst < 1.0  # pushed close to the cap 0.97^3 = 0.913, never to 1

    model.eval()
    iresnet.converge_spectral_norms(model)
    bounds = [iresnet.lipschitz_bound(block.g, shape) for block in model]
    assert max(bounds) < 1.0
    for scale in (1.0, 10.0):  # in distribution and 10 sigma out of it
        x = scale * torch.randn(64, *shape, device=device)
        y, _ = model(x)
        torch.testing.assert_close(model.inverse(y), x, atol=1e-4 * scale, rtol=1e-4)
