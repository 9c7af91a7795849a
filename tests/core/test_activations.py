"""LipSwish, z * sigmoid(beta z) / 1.1, is 1-Lipschitz for every beta > 0, with beta learnable."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import iresnet

# d/dt [t sigmoid(t)] ranges over (-0.0998.., 1.0998..], for every beta after t = beta z.
LOWER, UPPER = -0.1 / 1.1, 1.0
BETAS = [1e-6, 1e-2, 0.5, 1.0, 10.0, 1e4]


def lipswish(beta: float, device: torch.device) -> iresnet.LipSwish:
    return iresnet.LipSwish(beta).double().to(device)


def slopes(act: iresnet.LipSwish, z: torch.Tensor) -> torch.Tensor:
    """The derivative of ``act`` at every point of ``z``, by autograd."""
    z = z.clone().requires_grad_()
    (dz,) = torch.autograd.grad(act(z).sum(), z)
    return dz


def grid(beta: float, device: torch.device) -> torch.Tensor:
    """A dense float64 grid: |beta z| <= 25 (where the slope varies) plus a fixed window."""
    t = torch.linspace(-25.0, 25.0, 100_001, dtype=torch.float64, device=device)
    return torch.cat([t / beta, torch.linspace(-100.0, 100.0, 20_001, dtype=torch.float64, device=device)])


@pytest.mark.parametrize("beta", BETAS)
def test_slope_within_bounds(beta: float, device: torch.device) -> None:
    """The derivative lies in (-0.1/1.1, 1] everywhere on the grid."""
    d = slopes(lipswish(beta, device), grid(beta, device))
    assert torch.isfinite(d).all()
    assert d.min().item() > LOWER
    assert d.max().item() <= UPPER


@pytest.mark.parametrize("beta", BETAS)
def test_slope_bound_is_tight(beta: float, device: torch.device) -> None:
    """The extreme slopes (1.0998/1.1 and -0.0998/1.1) are attained, so the bounds are tight."""
    d = slopes(lipswish(beta, device), grid(beta, device))
    assert d.max().item() > 0.9995
    assert d.min().item() < LOWER + 0.001


@pytest.mark.parametrize("beta", [100.0, 1e4])
def test_large_beta_max_slope_on_fixed_grid(beta: float, device: torch.device) -> None:
    """For large beta the steepest point is near 0 and reached on a plain grid over [-5, 5]."""
    z = torch.linspace(-5.0, 5.0, 2_000_001, dtype=torch.float64, device=device)
    assert 0.999 < slopes(lipswish(beta, device), z).max().item() <= UPPER


@pytest.mark.parametrize("beta", [1e-3, 0.5, 10.0])
def test_difference_quotients_at_most_one(beta: float, device: torch.device) -> None:
    """|phi(a) - phi(b)| <= |a - b| on random pairs at several scales."""
    act = lipswish(beta, device)
    a = (
        torch.randn(100_000, dtype=torch.float64, device=device)
        * torch.logspace(-2, 4, 100_000, device=device).double()
    )
    b = a + torch.randn_like(a) * a.abs().clamp_min(1e-3)
    with torch.no_grad():
        assert ((act(a) - act(b)).abs() <= (a - b).abs() * (1 + 1e-12)).all()


@pytest.mark.parametrize("beta", BETAS)
def test_initial_beta(beta: float, device: torch.device) -> None:
    """The module starts at the requested beta (up to float32 storage of the raw parameter)."""
    assert math.isclose(iresnet.LipSwish(beta).beta.item(), beta, rel_tol=1e-5)


def test_beta_is_learnable(device: torch.device) -> None:
    """The output depends on beta, so its raw parameter gets a nonzero, finite gradient."""
    act = lipswish(0.5, device)
    z = torch.linspace(-4, 4, 101, dtype=torch.float64, device=device)
    act(z).pow(2).sum().backward()
    grad = act.raw_beta.grad
    assert grad is not None and torch.isfinite(grad) and grad.abs().item() > 1e-3


def test_beta_stays_positive_under_optimisation(device: torch.device) -> None:
    """Gradient steps that push beta towards 0 and beyond leave it positive."""
    act = lipswish(0.5, device)
    optimiser = torch.optim.SGD(act.parameters(), lr=10.0)
    for _ in range(20):
        optimiser.zero_grad()
        act.beta.backward()  # descending beta itself drives it down as fast as it goes
        optimiser.step()
    assert act.raw_beta.item() < -5
    assert 0 < act.beta.item() < 0.01


@pytest.mark.parametrize("beta", [0.0, -1e-12, -1.0, float("-inf"), float("inf"), float("nan")])
def test_bad_beta_raises(beta: float) -> None:
    """Non-positive, infinite or NaN beta is rejected at construction."""
    with pytest.raises(ValueError, match="beta"):
        iresnet.LipSwish(beta)


@pytest.mark.parametrize("activation", [nn.ELU(), nn.ReLU(), nn.LeakyReLU(0.2), nn.Tanh()], ids=repr)
def test_torch_activations_certified_as_one_lipschitz_are(activation: nn.Module, device: torch.device) -> None:
    """The activations lipschitz_bound counts as 1-Lipschitz have slopes within [-1, 1]."""
    z = torch.linspace(-20, 20, 400_001, dtype=torch.float64, device=device, requires_grad=True)
    (slope,) = torch.autograd.grad(activation(z).sum(), z)
    assert slope.abs().max().item() <= 1.0
    assert iresnet.lipschitz_bound(nn.Sequential(activation), (1,)) == 1.0


def test_first_and_second_derivatives(device: torch.device) -> None:
    """gradcheck and gradgradcheck in z and beta: the log-det's Neumann gradient needs both."""
    swish = iresnet.LipSwish(0.7).double().to(device)
    z = 3 * torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    raw = swish.raw_beta.detach().clone().requires_grad_()

    def phi(z: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(swish, {"raw_beta": raw}, (z,))

    assert torch.autograd.gradcheck(phi, (z, raw))
    assert torch.autograd.gradgradcheck(phi, (z, raw))
