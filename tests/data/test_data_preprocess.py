"""Dequantisation, the logit transform and the bits/dim bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, TransformedDistribution, Uniform
from torch.distributions.transforms import SigmoidTransform

import iresnet
from helpers import jacobian_logdet
from iresnet.data import Logit, UniformDequantize, bits_per_dim


def images(levels: int, device, shape=(4, 1, 3, 3)) -> torch.Tensor:
    return torch.randint(levels, shape, device=device).double()


def test_dequantize_stays_in_its_cell_and_inverts(device):
    x = images(17, device)
    y, logdet = UniformDequantize(17)(x)
    assert ((y >= 0) & (y < 1)).all()
    torch.testing.assert_close(UniformDequantize(17).inverse(y), x)
    torch.testing.assert_close(logdet, torch.full((4,), -9 * math.log(17), dtype=torch.float64, device=device))


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.full((2, 3), 0.5), "not all integers"),
        (torch.full((2, 3), 17.0), r"integers in \[0, 16\]"),
        (torch.full((2, 3), -1.0), r"integers in \[0, 16\]"),
        (torch.tensor([[0.0, float("nan")]]), "not all integers"),
    ],
)
def test_dequantize_rejects_non_images(device, bad, message):
    with pytest.raises(ValueError, match=message):
        UniformDequantize(17)(bad.to(device))


def test_logit_logdet_matches_jacobian_and_inverts(device):
    logit = Logit(alpha=0.05)
    x = torch.rand(5, 2, 2, 2, dtype=torch.float64, device=device)
    y, logdet = logit(x)
    torch.testing.assert_close(logdet, jacobian_logdet(logit, x))
    torch.testing.assert_close(logit.inverse(y), x)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        logit(x + 1)


def logistic(shape, device) -> Independent:
    """The standard logistic distribution per dimension: sigmoid^-1 of a uniform."""
    zeros = torch.zeros(shape, dtype=torch.float64, device=device)
    uniform = Uniform(zeros, zeros + 1)
    return Independent(TransformedDistribution(uniform, [SigmoidTransform().inv]), len(shape))


@pytest.mark.parametrize("levels, alpha", [(256, 0.05), (17, 1e-6)])
def test_bits_per_dim_of_a_uniform_model(device, levels, alpha):
    """Dequantise, logit, then a logistic base: the model is uniform on [0, 1)^D up to the 2 alpha
    of logistic mass beyond the logit's range, so bits/dim is exactly log2(L) - log2(1 - 2 alpha),
    8 bits for 8-bit data: every term of the bookkeeping must be right for this to hold."""
    model = iresnet.Sequential(UniformDequantize(levels), Logit(alpha))
    flow = iresnet.Flow(iresnet.as_transform(model, event_dim=3), logistic((1, 3, 3), device))
    x = images(levels, device, (64, 1, 3, 3))
    bpd = bits_per_dim(flow.log_prob(x), 9)
    expected = math.log2(levels) - math.log2(1 - 2 * alpha)
    torch.testing.assert_close(bpd, torch.full_like(bpd, expected))
