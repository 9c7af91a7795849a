"""Toy 2-D densities: shapes, reproducibility, supports and the entropies quoted as floors."""

from __future__ import annotations

import math

import pytest
import torch

from iresnet.data import TOY_DATASETS, eight_gaussians_log_prob, sample_toy, toy_entropy


@pytest.mark.parametrize("name", list(TOY_DATASETS))
def test_samplers_shape_dtype_and_reproducibility(name):
    first = sample_toy(name, 1001, torch.Generator().manual_seed(1))
    again = sample_toy(name, 1001, torch.Generator().manual_seed(1))
    other = sample_toy(name, 1001, torch.Generator().manual_seed(2))
    assert first.shape == (1001, 2) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    assert 0.5 < first.std(0).min() and first.abs().max() < 10  # on the usual [-4, 4] scale


def test_checkerboard_is_uniform_on_the_black_squares():
    x = sample_toy("checkerboard", 80_000, torch.Generator().manual_seed(0))
    cells = torch.floor(x / 2).long()
    assert (x.abs() <= 4).all()
    assert ((cells.sum(1) % 2) == 0).all()
    _, counts = torch.unique(cells, dim=0, return_counts=True)
    assert counts.numel() == 8
    assert (counts.double() / x.shape[0] - 1 / 8).abs().max() < 0.01


def test_rings_lie_on_four_radii():
    radius = sample_toy("rings", 20_000, torch.Generator().manual_seed(0)).norm(dim=1)
    nearest = (radius[:, None] - torch.tensor([0.75, 1.5, 2.25, 3.0])).abs().min(1).values
    assert nearest.median() < 0.1


def test_eight_gaussians_density_is_normalised_and_matches_samples():
    grid = torch.linspace(-5, 5, 801, dtype=torch.float64)
    points = torch.cartesian_prod(grid, grid)
    mass = eight_gaussians_log_prob(points).exp().sum() * (grid[1] - grid[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=1e-6)
    x = sample_toy("8gaussians", 50_000, torch.Generator().manual_seed(0)).double()
    # samples from the density score higher under it than under a shifted copy of it
    assert eight_gaussians_log_prob(x).mean() > eight_gaussians_log_prob(x + 0.3).mean() + 0.1


def test_entropies():
    assert toy_entropy("checkerboard") == pytest.approx(math.log(32))
    separated = math.log(8) + math.log(2 * math.pi * math.e * (0.5 / 1.414) ** 2)
    estimate = toy_entropy("8gaussians", n_samples=400_000)
    assert estimate == pytest.approx(2.831, abs=0.005)
    assert estimate < separated  # overlap lowers the entropy below the separated mixture's


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown toy data set 'spiral'"):
        sample_toy("spiral", 10)
    with pytest.raises(ValueError, match="no known entropy"):
        toy_entropy("moons")
