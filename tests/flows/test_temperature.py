"""Samples at a temperature: the latent drawn from the prior with its scale times T, then inverted.
With the identity transform (an empty ``iresnet.Sequential``) the samples are the latent itself."""

from __future__ import annotations

import math

import pytest
import torch

import iresnet
from iresnet.flows.density import DensityModel
from iresnet.report.pictures import sample_run


@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.0, 2.0])
def test_temperature_scales_the_spread(temperature: float) -> None:
    model = DensityModel(iresnet.Sequential(), (4,), learned_prior=True)
    with torch.no_grad():
        model.prior_loc.copy_(torch.tensor([0.0, 1.0, -2.0, 3.0]))
        model.prior_log_scale.copy_(torch.tensor([0.0, 0.5, -0.5, 1.0]))
    n = 20_000
    torch.manual_seed(0)
    samples = model.sample(n, temperature=temperature)
    sigma = temperature * model.prior_log_scale.detach().exp()
    # std of a sample std ~ sigma / sqrt(2 n); of the mean, sigma / sqrt(n): 6 of them
    assert torch.allclose(samples.std(0), sigma, atol=0, rtol=6 / math.sqrt(2 * n))
    assert torch.allclose(samples.mean(0), model.prior_loc.detach(), atol=float(6 * sigma.max() / math.sqrt(n)))


def test_temperature_one_is_the_model_itself() -> None:
    model = DensityModel(iresnet.Sequential(), (3,))
    torch.manual_seed(1)
    plain = model.sample(50)
    torch.manual_seed(1)
    assert torch.equal(model.sample(50, temperature=1.0), plain)


def test_temperature_of_the_class_conditional_prior() -> None:
    means = torch.tensor([[4.0, 0.0], [-4.0, 0.0]])
    model = DensityModel(iresnet.Sequential(), (2,), class_means=means)
    n, temperature = 20_000, 0.5
    torch.manual_seed(2)
    given = model.sample(n, torch.ones(n, dtype=torch.long), temperature=temperature)
    assert torch.allclose(given.mean(0), means[1], atol=6 * temperature / math.sqrt(n))
    assert torch.allclose(given.std(0), torch.full((2,), temperature), rtol=6 / math.sqrt(2 * n))
    mixture = model.sample(n, temperature=temperature)  # each point near one of the means, spread T
    nearest = torch.cdist(mixture, means).argmin(1)
    assert torch.allclose((mixture - means[nearest]).std(0), torch.full((2,), temperature), rtol=0.05)
    assert (
        model.prior(temperature)
        .log_prob(means)
        .exp()
        .mul(2)
        .allclose(torch.full((2,), 1 / (2 * math.pi * temperature**2)), rtol=1e-4)
    )


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_a_temperature_not_above_zero_is_refused(temperature: float) -> None:
    model = DensityModel(iresnet.Sequential(), (2,))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        model.sample(4, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        model.prior(temperature)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        sample_run("no-such-run", temperature=temperature)  # refused before the run is read
