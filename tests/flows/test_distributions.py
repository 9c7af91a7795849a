"""Flow and as_transform: the change-of-variables density, sampling by inversion, image shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal, TransformedDistribution

import iresnet
from helpers import dense_branch

DTYPE = torch.float64


def make_model(device: torch.device, coeff: float = 0.7, **block_kwargs) -> iresnet.Sequential:
    """ResidualBlock -> ActNorm -> ResidualBlock on R^2, float64, eval mode, norms converged."""
    model = iresnet.Sequential(
        iresnet.ResidualBlock(dense_branch(2, 16, coeff), logdet="exact", **block_kwargs),
        iresnet.ActNorm(2),
        iresnet.ResidualBlock(dense_branch(2, 16, coeff), logdet="exact", **block_kwargs),
    ).to(device=device, dtype=DTYPE)
    with torch.no_grad():  # a fixed, non-trivial ActNorm (log-det 0.15) instead of data init
        model[1].bias.copy_(torch.tensor([0.3, -0.2]))
        model[1].log_scale.copy_(torch.tensor([0.25, -0.1]))
        model[1].initialized.fill_(True)
    iresnet.converge_spectral_norms(model)
    return model.eval()


def standard_normal(shape: tuple[int, ...], device: torch.device) -> Independent:
    zeros = torch.zeros(shape, dtype=DTYPE, device=device)
    return Independent(Normal(zeros, torch.ones_like(zeros)), len(shape))


def make_flow(device: torch.device, **kwargs) -> tuple[iresnet.Flow, iresnet.Sequential]:
    model = make_model(device, **kwargs)
    return iresnet.Flow(iresnet.as_transform(model), standard_normal((2,), device)), model


def latent(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


def test_log_prob_matches_transformed_distribution(device: torch.device) -> None:
    """Flow(t, base) is TransformedDistribution(base, [t.inv]) on the same points."""
    flow, model = make_flow(device)
    reference = TransformedDistribution(flow.base, [iresnet.as_transform(model).inv])
    x = 2 * torch.randn(64, 2, dtype=DTYPE, device=device)
    torch.testing.assert_close(flow.log_prob(x), reference.log_prob(x), rtol=0, atol=1e-10)


def test_log_prob_matches_brute_force_jacobian(device: torch.device) -> None:
    """log p(x) = log N(f(x)) + log|det df/dx| with the Jacobian of the whole map by autograd."""
    flow, model = make_flow(device)
    x = 2 * torch.randn(8, 2, dtype=DTYPE, device=device)
    expected = []
    for xi in x:

        def f(v: torch.Tensor) -> torch.Tensor:
            return model(v.unsqueeze(0))[0].squeeze(0)

        jacobian = torch.autograd.functional.jacobian(f, xi)
        z = f(xi).detach()
        log_normal = -0.5 * z.pow(2).sum() - math.log(2 * math.pi)
        expected.append(log_normal + torch.linalg.slogdet(jacobian).logabsdet)
    torch.testing.assert_close(flow.log_prob(x), torch.stack(expected), rtol=0, atol=1e-10)


def test_density_integrates_to_one(device: torch.device) -> None:
    """Midpoint quadrature of exp(log_prob) over [-L, L]^2 is 1 up to a certified tail bound.

    f is bi-Lipschitz: |f(x) - f(0)| >= rho |x| with rho = prod(1 - Lip g_i) * min(actnorm
    scale), so the mass outside the box is at most P(|Z| >= rho L - |f(0)|) =
    exp(-(rho L - |f(0)|)^2 / 2) for Z ~ N(0, I_2). The midpoint rule on a smooth density
    with Gaussian tails is accurate far beyond 1e-6 at spacing 0.05 (that is its whole
    budget here), so an error in any layer's log-determinant (ActNorm's alone is 0.15) fails.
    """
    flow, model = make_flow(device, coeff=0.5)
    lip = [
        math.prod(torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item() for layer in block.g[::2])
        for block in (model[0], model[2])
    ]
    rho = (1 - lip[0]) * (1 - lip[1]) * model[1].log_scale.detach().min().exp().item()
    f0 = latent(model, torch.zeros(1, 2, dtype=DTYPE, device=device)).norm().item()
    half_width, h = 15.0, 0.05
    radius = rho * half_width - f0
    assert radius > 5, "box too small for a useful tail bound"
    tail = math.exp(-(radius**2) / 2)

    centres = torch.arange(-half_width + h / 2, half_width, h, dtype=DTYPE, device=device)
    grid = torch.cartesian_prod(centres, centres)
    with torch.no_grad():
        mass = sum(flow.log_prob(chunk).exp().sum() for chunk in grid.split(100_000)) * h * h
    assert abs(mass.item() - 1) <= tail + 1e-6


@pytest.mark.parametrize("sample_shape", [(), (5,), (2, 3)])
def test_sample_shapes(sample_shape: tuple[int, ...], device: torch.device) -> None:
    """sample() and rsample() have shape sample_shape + event_shape; log_prob has sample_shape."""
    flow, _ = make_flow(device)
    for draw in (flow.sample(sample_shape), flow.rsample(sample_shape)):
        assert draw.shape == torch.Size(sample_shape) + flow.event_shape
        assert draw.dtype == DTYPE and torch.isfinite(draw).all()
        assert flow.log_prob(draw).shape == torch.Size(sample_shape)


def test_samples_map_back_to_base_draws(device: torch.device) -> None:
    """f(flow.sample()) equals the base draws under the same seed: sampling inverts f."""
    flow, model = make_flow(device)
    torch.manual_seed(1)
    x = flow.sample((500,))
    torch.manual_seed(1)
    z = flow.base.sample((500,))
    torch.testing.assert_close(latent(model, x), z, rtol=0, atol=1e-8)


def test_mapped_samples_are_standard_normal(device: torch.device) -> None:
    """f(flow.sample((n,))) has mean ~0 and covariance ~I.

    Each mean coordinate has sd 1/sqrt(n) and each covariance entry sd <= sqrt(2/n); 5 sd
    bounds give a false-alarm rate below 1e-5 per entry, while a flow that sampled through
    the wrong map (e.g. forward instead of inverse) moves these by O(1)."""
    flow, model = make_flow(device)
    n = 4000
    z = latent(model, flow.sample((n,)))
    assert (z.mean(0).abs() <= 5 / math.sqrt(n)).all()
    eye = torch.eye(2, dtype=DTYPE, device=device)
    assert ((torch.cov(z.T) - eye).abs() <= 5 * math.sqrt(2 / n)).all()


def test_block_inverse_gradcheck(device: torch.device) -> None:
    """The implicit gradient of y -> ResidualBlock.inverse(y) matches finite differences."""
    block = iresnet.ResidualBlock(dense_branch(3, 8, 0.8), logdet="exact", atol=1e-13, rtol=1e-13)
    block = block.to(device=device, dtype=DTYPE)
    iresnet.converge_spectral_norms(block)
    block.eval()
    y = torch.randn(4, 3, dtype=DTYPE, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(block.inverse, (y,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_rsample_parameter_gradient_matches_finite_differences(device: torch.device) -> None:
    """d/dtheta of a scalar of rsample (fixed base noise) equals central differences for every
    parameter of both residual branches and the ActNorm."""
    flow, model = make_flow(device, atol=1e-13, rtol=1e-13)
    weights = torch.randn(16, 2, dtype=DTYPE, device=device)

    def objective() -> torch.Tensor:
        torch.manual_seed(7)  # the same base noise on every call
        return (flow.rsample((16,)) * weights).sum() + flow.rsample((4,)).pow(2).sum()

    params = dict(model.named_parameters())
    branch = [name for name in params if ".g." in name]
    assert len(branch) == 10  # per block: two Linear (weight, bias) and LipSwish's raw_beta
    grads = dict(zip(params, torch.autograd.grad(objective(), list(params.values()), allow_unused=True)))
    eps = 1e-6
    for name, p in params.items():
        assert grads[name] is not None, f"no gradient reaches {name}"
        numeric = torch.zeros_like(p)
        with torch.no_grad():
            for i in range(p.numel()):
                original = p.view(-1)[i].item()
                p.view(-1)[i] = original + eps
                up = objective()
                p.view(-1)[i] = original - eps
                down = objective()
                p.view(-1)[i] = original
                numeric.view(-1)[i] = (up - down) / (2 * eps)
        torch.testing.assert_close(grads[name], numeric, rtol=1e-5, atol=1e-7, msg=name)
    assert all(grads[name].abs().sum() > 0 for name in branch)


@pytest.mark.parametrize("wrap", [False, True])
def test_missing_logdet_raises(wrap: bool, device: torch.device) -> None:
    """A module computing no log-det (logdet=None), alone or in a Sequential, gives ValueError
    in log_prob, while sampling still works."""
    module: nn.Module = iresnet.ResidualBlock(dense_branch(2, 8, 0.7), logdet=None)
    if wrap:
        module = iresnet.Sequential(iresnet.ActNorm(2), module)
    module = module.to(device=device, dtype=DTYPE).eval()
    flow = iresnet.Flow(iresnet.as_transform(module), standard_normal((2,), device))
    with pytest.raises(ValueError, match="log-determinant"):
        flow.log_prob(torch.randn(3, 2, dtype=DTYPE, device=device))
    assert flow.sample((3,)).shape == (3, 2)


@pytest.mark.parametrize("batch", [(4,), (2, 3)])
def test_squeeze_transform_round_trips_images(batch: tuple[int, ...], device: torch.device) -> None:
    """as_transform(Squeeze(), event_dim=3) maps (..., C, H, W) to (..., 4C, H/2, W/2) by the
    2x2 space-to-depth permutation, inverts exactly, and has log-det 0 of the batch shape."""
    t = iresnet.as_transform(iresnet.Squeeze(), event_dim=3)
    x = torch.randn(*batch, 3, 4, 6, dtype=DTYPE, device=device)
    y = t(x)
    assert y.shape == (*batch, 12, 2, 3)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                assert torch.equal(y[..., 4 * c + 2 * i + j, :, :], x[..., c, i::2, j::2])
    assert torch.equal(t.inv(y), x)
    assert torch.equal(t.log_abs_det_jacobian(x, y), torch.zeros(batch, dtype=DTYPE, device=device))


def test_image_flow_log_prob_and_sample(device: torch.device) -> None:
    """A flow on (C, H, W) images through Squeeze and ActNorm: log_prob is the base density of
    the squeezed, scaled image plus (H W / 4) * sum(log_scale); samples are images."""
    actnorm = iresnet.ActNorm(8).to(device=device, dtype=DTYPE).eval()
    with torch.no_grad():
        actnorm.log_scale.uniform_(-0.5, 0.5)
        actnorm.bias.normal_()
    module = iresnet.Sequential(iresnet.Squeeze(), actnorm)
    flow = iresnet.Flow(iresnet.as_transform(module, event_dim=3), standard_normal((8, 2, 3), device))
    x = torch.randn(5, 2, 4, 6, dtype=DTYPE, device=device)
    z = (iresnet.Squeeze()(x)[0] + actnorm.bias.view(1, 8, 1, 1)) * actnorm.log_scale.exp().view(1, 8, 1, 1)
    expected = flow.base.log_prob(z) + 6 * actnorm.log_scale.sum()
    torch.testing.assert_close(flow.log_prob(x), expected.detach(), rtol=0, atol=1e-10)
    assert flow.sample((7,)).shape == (7, 2, 4, 6)


def test_image_flow_event_shape(device: torch.device) -> None:
    """A Flow's event_shape is that of its samples (data space), not of the base (latents)."""
    module = iresnet.Squeeze()
    flow = iresnet.Flow(iresnet.as_transform(module, event_dim=3), standard_normal((8, 2, 3), device))
    assert flow.sample().shape == flow.event_shape
