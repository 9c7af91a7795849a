"""MultiScale: its input and its latent are checked against the event shape it was built for."""

from __future__ import annotations

import pytest
import torch

import iresnet
from helpers import conv_branch


def test_multiscale_refuses_an_input_or_latent_of_another_shape(device):
    """The audit: a 16x16 image through a flow built for 8x8 gave a latent of 256, not the 64 of
    forward_shape; a latent of 100 died in split_with_sizes."""
    stages = [iresnet.ResidualBlock(conv_branch(c, 4, 0.9), "exact") for c in (4, 8)]
    multiscale = iresnet.MultiScale(stages, (1, 8, 8), squeeze_first=True, factor_out=True).to(device)
    assert multiscale.forward_shape((1, 8, 8)) == (64,)
    with pytest.raises(ValueError, match=r"MultiScale input: expected shape \(batch, 1, 8, 8\)"):
        multiscale(torch.randn(2, 1, 16, 16, device=device))
    with pytest.raises(ValueError, match=r"MultiScale.inverse input: expected shape \(batch, 64\)"):
        multiscale.inverse(torch.randn(2, 100, device=device))
    z, _ = multiscale(torch.randn(2, 1, 8, 8, device=device))
    assert z.shape == (2, 64)
