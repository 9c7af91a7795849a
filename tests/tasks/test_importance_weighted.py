"""The importance-weighted bits/dim over K dequantisation samples (Burda et al., 2016): exact in
the limit on a model whose discrete probabilities are known, never below the single-sample mean
of the same draws, and the single-sample evaluation itself for K = 1."""

from __future__ import annotations

import math

import pytest
import torch

import iresnet
from iresnet.data.preprocess import Logit, UniformDequantize
from iresnet.flows.density import DensityModel
from iresnet.tasks import (
    dequantisation_log_probs,
    evaluate,
    evaluate_importance_weighted,
    evaluation_randomness,
    importance_weighted,
    summarize,
)

LEVELS, ALPHA, DIM = 4, 0.05, 2


def known_model() -> DensityModel:
    """Dequantise, logit, standard Gaussian prior (learned_prior only so that it has parameters,
    left at zero): the cell of x has probability prod_d [Phi(logit s(x_d + 1)) - Phi(logit s(x_d))]."""
    transform = iresnet.Sequential(UniformDequantize(LEVELS), Logit(ALPHA))
    return DensityModel(transform, (DIM,), learned_prior=True).double()


def exact_log_probability(x: torch.Tensor) -> torch.Tensor:
    """log P(x) of :func:`known_model`: the Gaussian mass of each dimension's cell, in float64."""

    def edge(v: torch.Tensor) -> torch.Tensor:
        s = ALPHA + (1 - 2 * ALPHA) * v / LEVELS
        return torch.special.ndtr(torch.log(s) - torch.log1p(-s))

    return torch.log(edge(x + 1) - edge(x)).sum(1)


def images(n: int = 12) -> torch.Tensor:
    return torch.randint(0, LEVELS, (n, DIM), generator=torch.Generator().manual_seed(0)).double()


def test_many_samples_reach_the_discrete_log_likelihood() -> None:
    model, x, k = known_model(), images(), 4096
    with evaluation_randomness(seed=1):
        log_probs = dequantisation_log_probs(model, x, k, batch_size=8192)
    weighted = importance_weighted(log_probs)
    exact = exact_log_probability(x)
    # each image's estimate: log of a mean of K weights, its standard error sd(w) / (sqrt(K) mean(w))
    w = (log_probs - log_probs.max(1, keepdim=True).values).exp()
    se = w.std(1) / (math.sqrt(k) * w.mean(1))
    assert ((weighted - exact).abs() < 5 * se + 1e-12).all()
    assert (weighted <= exact + 5 * se).all()
    # the single-sample figure, E log p(x + u), is measurably below log P(x) on average over images
    # (barely in the middle cells, where the density is nearly flat; much in the edge cells)
    single = log_probs.mean(1)
    single_se = (log_probs.var(1) / k).sum().sqrt() / len(x)
    assert (exact - single).mean() > 10 * single_se
    assert (single <= exact).all()


def test_evaluation_reports_the_mean_over_images_in_bits_per_dim() -> None:
    model, x = known_model(), images()
    with evaluation_randomness(seed=2):
        result = evaluate_importance_weighted(model, x, 2048, batch_size=4096)
    exact = -exact_log_probability(x).mean().item()
    assert result.k == 2048 and result.n == len(x)
    assert result.nll == pytest.approx(exact, abs=0.02)
    assert result.bits_per_dim == pytest.approx(result.nll / (DIM * math.log(2)))
    assert result.metrics()["k"] == 2048 and str(result).startswith("importance-weighted (K=2048) test NLL")


def test_importance_weighting_never_falls_below_the_single_sample_mean() -> None:
    model, x = known_model(), images(32)
    with evaluation_randomness(seed=3):
        log_probs = dequantisation_log_probs(model, x, 8, batch_size=20)  # images split across batches
    assert log_probs.shape == (32, 8)
    assert (importance_weighted(log_probs) >= log_probs.mean(1)).all()
    assert summarize(importance_weighted(log_probs), DIM, True).nll <= summarize(log_probs.flatten(), DIM, True).nll


@pytest.mark.parametrize("batch_size", [5, 500])
def test_one_sample_is_the_single_sample_evaluation(batch_size: int) -> None:
    model, x = known_model(), images(12)
    with evaluation_randomness(seed=4):
        single = evaluate(model, x, discrete=True, batch_size=batch_size)
    with evaluation_randomness(seed=4):
        weighted = evaluate_importance_weighted(model, x, 1, batch_size=batch_size)
    assert weighted.nll == single.nll and weighted.nll_se == single.nll_se
    assert weighted.bits_per_dim == single.bits_per_dim and weighted.bits_per_dim_se == single.bits_per_dim_se


def test_k_must_be_positive() -> None:
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        evaluate_importance_weighted(known_model(), images(), 0)
