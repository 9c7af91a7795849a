"""Variational dequantisation (Flow++): the log-det's bookkeeping against the logit-normal
density written out apart, q a density on (0, 1), the standard logit-normal at initialisation,
the variational bound below the exact discrete log-likelihood with gradients reaching q, and
the image flows' option."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import iresnet
from iresnet.data import Logit, VariationalDequantize
from iresnet.flows.density import DensityModel
from iresnet.models import image_flow

LEVELS = 5


def randomised(shape: tuple[int, int, int], seed: int = 0) -> VariationalDequantize:
    """A layer in float64 whose last convolution is random (not zero), so that mu and s vary."""
    torch.manual_seed(seed)
    layer = VariationalDequantize(LEVELS, shape, hidden=4).double()
    last = layer.net[-1]
    with torch.no_grad():
        last.weight.normal_(0, 0.3)
        last.bias.normal_(0, 0.3)
    return layer


def integers(n: int, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, LEVELS, (n, *shape), generator=torch.Generator().manual_seed(seed)).double()


def logit_normal_log_density(u: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log q(u) = sum log N(logit u; mu, exp(s)^2) - sum log(u (1 - u)), per sample."""
    sigma = torch.exp(s)
    h = torch.log(u / (1 - u))
    normal = -0.5 * ((h - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    return (normal - torch.log(u * (1 - u))).flatten(1).sum(1)


def test_logdet_is_minus_d_log_l_minus_the_noise_log_density() -> None:
    shape = (2, 3, 3)
    layer, x = randomised(shape), integers(4, shape)
    torch.manual_seed(7)
    y, logdet = layer(x)
    torch.manual_seed(7)
    eps = torch.randn_like(x)  # the layer's own draw, again
    out = layer.net(x / LEVELS - 0.5)
    mu, s = out[:, :2], out[:, 2:]
    assert s.abs().max() > 0.1 and mu.abs().max() > 0.1
    u = torch.sigmoid(mu + torch.exp(s) * eps)
    torch.testing.assert_close(y, (x + u) / LEVELS, rtol=0, atol=1e-12)
    d = math.prod(shape)
    expected = -d * math.log(LEVELS) - logit_normal_log_density(u, mu, s)
    torch.testing.assert_close(logdet, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.log_q(u, x), logit_normal_log_density(u, mu, s), rtol=0, atol=1e-10)


@pytest.mark.parametrize("value", [0.0, 2.0, 4.0])
def test_q_integrates_to_one_on_the_unit_interval(value: float) -> None:
    layer = randomised((1, 1, 1), seed=3)
    x = torch.full((1, 1, 1, 1), value, dtype=torch.float64)
    n = 200_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # the midpoint rule on (0, 1)
    q = torch.exp(layer.log_q(u.reshape(n, 1, 1, 1), x.expand(n, 1, 1, 1)))
    assert abs(q.mean().item() - 1) < 1e-4


def test_a_fresh_layer_is_the_standard_logit_normal() -> None:
    shape = (1, 4, 4)
    layer = VariationalDequantize(LEVELS, shape).double()
    x = integers(3, shape)
    torch.manual_seed(11)
    y, logdet = layer(x)
    torch.manual_seed(11)
    h = torch.randn_like(x)
    torch.testing.assert_close(y, (x + torch.sigmoid(h)) / LEVELS, rtol=0, atol=1e-12)
    log_normal = -0.5 * h**2 - 0.5 * math.log(2 * math.pi)
    log_derivative = torch.log(torch.sigmoid(h) * (1 - torch.sigmoid(h)))
    expected = -16 * math.log(LEVELS) - (log_normal - log_derivative).flatten(1).sum(1)
    torch.testing.assert_close(logdet, expected, rtol=0, atol=1e-10)


ALPHA = 0.05


def exact_log_probability(x: torch.Tensor) -> torch.Tensor:
    """log P(x) of dequantise, logit, standard Gaussian: each dimension's cell's Gaussian mass."""

    def edge(v: torch.Tensor) -> torch.Tensor:
        s = ALPHA + (1 - 2 * ALPHA) * v / LEVELS
        return torch.special.ndtr(torch.log(s) - torch.log1p(-s))

    return torch.log(edge(x + 1) - edge(x)).flatten(1).sum(1)


def test_the_bound_is_below_the_discrete_log_likelihood_and_trains_q() -> None:
    shape = (1, 1, 2)
    layer = randomised(shape, seed=5)
    model = DensityModel(iresnet.Sequential(layer, Logit(ALPHA)), shape).double()
    x = integers(6, shape, seed=2)
    k = 4000
    torch.manual_seed(0)
    with torch.no_grad():
        draws = model(x.repeat(k, 1, 1, 1)).reshape(k, len(x))
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(k)
    exact = exact_log_probability(x)
    assert (mean <= exact + 3 * se).all()
    assert (mean < exact).any()
    model(x).mean().backward()
    grads = [p.grad for p in layer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_image_flow_option_builds_the_layer_and_refuses_a_bad_value() -> None:
    model = image_flow((1, 4, 4), 17, scales=1, blocks=1, hidden=4, dequantization="variational")
    assert isinstance(model.transform[0], VariationalDequantize)
    assert model(torch.randint(0, 17, (3, 1, 4, 4))).shape == (3,)
    with pytest.raises(ValueError, match="dequantization must be one of 'uniform', 'variational', got 'learned'"):
        image_flow((1, 4, 4), 17, dequantization="learned")


def test_the_command_line_trains_with_variational_dequantisation(tmp_path: Path) -> None:
    from iresnet.cli import main

    out = tmp_path / "run"
    args = ["train", "--preset", "digits", "--out", str(out), "model.dequantization=variational", "model.blocks=1"]
    args += ["model.hidden=8", "eval_size=64", "--batch-size", "32", "--steps", "2", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    assert '"dequantization": "variational"' in (out / "config.json").read_text()
