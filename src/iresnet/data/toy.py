r"""Toy 2-D densities with the definitions used across the flow literature (as in FFJORD,
Grathwohl et al., ICLR 2019, https://arxiv.org/abs/1810.01367), written anew with torch.

Every sampler takes the number of points and a ``torch.Generator`` (or ``None`` for the global
one) and returns a float32 tensor of shape ``(n, 2)``.

True entropies, the floor of the achievable negative log-likelihood (nats per point):

- ``checkerboard``: uniform on 8 squares of side 2, area 32, so :math:`H = \log 32 = 3.466`.
- ``8gaussians``: an equal mixture of 8 Gaussians with standard deviation
  :math:`0.5 / 1.414`; :math:`H = -E[\log p(x)]` has no closed form because the components
  overlap slightly, so :func:`toy_entropy` estimates it by Monte Carlo with the exact
  mixture density :func:`eight_gaussians_log_prob` (about 2.831, against 2.838 for perfectly
  separated components).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TOY_DATASETS", "sample_toy", "toy_entropy", "eight_gaussians_log_prob"]

_SCALE = 1.414


def _rand(n: int, generator: torch.Generator | None, *shape: int) -> Tensor:
    return torch.rand(n, *shape, generator=generator, dtype=torch.float64)


def _randn(n: int, generator: torch.Generator | None, *shape: int) -> Tensor:
    return torch.randn(n, *shape, generator=generator, dtype=torch.float64)


def _eight_gaussian_centers() -> Tensor:
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    return 4.0 * torch.stack([torch.cos(angles), torch.sin(angles)], 1)


def eight_gaussians(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Centres on a circle of radius 4, noise 0.5, all divided by 1.414."""
    which = torch.randint(8, (n,), generator=generator)
    return (_eight_gaussian_centers()[which] + 0.5 * _randn(n, generator, 2)) / _SCALE


def eight_gaussians_log_prob(x: Tensor) -> Tensor:
    """The exact log-density of :func:`eight_gaussians`."""
    centers = (_eight_gaussian_centers() / _SCALE).to(x)
    std = 0.5 / _SCALE
    squared = (x[:, None, :] - centers[None]).pow(2).sum(-1)
    log_components = -squared / (2 * std**2) - math.log(2 * math.pi * std**2)
    return torch.logsumexp(log_components, 1) - math.log(8)


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform on the black squares of a 4 x 4 board of side 8 (8 squares of side 2)."""
    x1 = 4 * _rand(n, generator) - 2
    x2 = _rand(n, generator) - 2 * torch.randint(2, (n,), generator=generator) + torch.floor(x1) % 2
    return 2 * torch.stack([x1, x2], 1)


def two_spirals(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Two interleaved spirals of 1.5 turns, jittered, with Gaussian noise 0.1."""
    half = n // 2
    turn = torch.sqrt(_rand(n - half, generator)) * 3 * math.pi
    arm = torch.stack([-torch.cos(turn) * turn, torch.sin(turn) * turn], 1) + 0.5 * _rand(n - half, generator, 2)
    return torch.cat([arm, -arm[:half]]) / 3 + 0.1 * _randn(n, generator, 2)


def moons(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Two interleaving half circles with Gaussian noise 0.1, scaled by 2 and shifted."""
    upper = torch.rand(n, generator=generator) < 0.5
    t = math.pi * _rand(n, generator)
    outer = torch.stack([torch.cos(t), torch.sin(t)], 1)
    inner = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
    points = torch.where(upper[:, None], outer, inner) + 0.1 * _randn(n, generator, 2)
    return 2 * points + torch.tensor([-1.0, -0.2], dtype=torch.float64)


def pinwheel(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Five arms: Gaussian blobs (radial 0.3, tangential 0.1) bent by an angle growing
    exponentially with the radius."""
    arm = torch.randint(5, (n,), generator=generator)
    features = _randn(n, generator, 2) * torch.tensor([0.3, 0.1], dtype=torch.float64)
    features[:, 0] += 1
    angles = arm * (2 * math.pi / 5) + 0.25 * torch.exp(features[:, 0])
    cos, sin = torch.cos(angles), torch.sin(angles)
    return 2 * torch.stack(
        [features[:, 0] * cos + features[:, 1] * sin, -features[:, 0] * sin + features[:, 1] * cos], 1
    )


def rings(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Four concentric circles of radii 3, 2.25, 1.5 and 0.75, noise 0.08."""
    radius = 3 * (4 - torch.randint(4, (n,), generator=generator).double()) / 4
    angle = 2 * math.pi * _rand(n, generator)
    return radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1) + 0.08 * _randn(n, generator, 2)


def circles(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Two concentric circles of radii 3 and 1.5, noise 0.24."""
    radius = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, 0.5).double()
    angle = 2 * math.pi * _rand(n, generator)
    points = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return 3 * (points + 0.08 * _randn(n, generator, 2))


def swissroll(n: int, generator: torch.Generator | None = None) -> Tensor:
    """The swiss roll seen from above: t (cos t, sin t) for t in [1.5 pi, 4.5 pi], noise 1,
    divided by 5."""
    t = 1.5 * math.pi * (1 + 2 * _rand(n, generator))
    points = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) + _randn(n, generator, 2)
    return points / 5


TOY_DATASETS: dict[str, Callable[[int, torch.Generator | None], Tensor]] = {
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "2spirals": two_spirals,
    "moons": moons,
    "pinwheel": pinwheel,
    "rings": rings,
    "circles": circles,
    "swissroll": swissroll,
}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` points of the toy density ``name`` (one of :data:`TOY_DATASETS`), float32."""
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY_DATASETS)}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return TOY_DATASETS[name](n, generator).float()


def toy_entropy(name: str, n_samples: int = 2_000_000, seed: int = 0) -> float:
    """The true entropy in nats of ``checkerboard`` (exact) or ``8gaussians`` (Monte Carlo
    with the exact density; standard error about 1e-3 at the default sample size)."""
    if name == "checkerboard":
        return math.log(32)
    if name == "8gaussians":
        generator = torch.Generator().manual_seed(seed)
        return -eight_gaussians_log_prob(eight_gaussians(n_samples, generator)).mean().item()
    raise ValueError(f"no known entropy for {name!r}; known: checkerboard, 8gaussians")
