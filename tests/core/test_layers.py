"""ActNorm (its data-dependent initialisation, initialize_from_data), Squeeze and InjectivePad."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import iresnet
from helpers import jacobian_logdet
from iresnet.core.validation import NonFiniteInputError


def test_actnorm_data_dependent_initialisation(device):
    norm = iresnet.ActNorm(3).double().to(device)
    x = (
        torch.randn(256, 3, 4, 4, dtype=torch.float64, device=device)
        * torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64, device=device).view(1, 3, 1, 1)
        + 7
    )
    y, _ = norm(x)
    torch.testing.assert_close(
        y.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64, device=device), atol=1e-10, rtol=0
    )
    var = x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(y.var((0, 2, 3), unbiased=False), var / (var + norm.eps), atol=1e-10, rtol=0)
    assert bool(norm.initialized)
    before = norm.bias.detach().clone()
    norm(x * 2)  # initialised once only
    torch.testing.assert_close(norm.bias.detach(), before)


def test_actnorm_logdet_and_inverse(device):
    norm = iresnet.ActNorm(2).double().to(device)
    x = torch.randn(8, 2, 3, 3, dtype=torch.float64, device=device) * 3
    norm(x)  # initialise
    with torch.no_grad():
        norm.log_scale.add_(torch.tensor([0.3, -0.7], dtype=torch.float64, device=device))
    y, logdet = norm(x)
    torch.testing.assert_close(logdet, jacobian_logdet(norm, x))
    torch.testing.assert_close(norm.inverse(y), x)
    with pytest.raises(ValueError, match="expected 2 channels"):
        norm(torch.randn(2, 3, dtype=torch.float64, device=device))


def test_actnorm_state_dict_keeps_initialisation(device):
    norm = iresnet.ActNorm(2).to(device)
    norm(torch.randn(16, 2, device=device) + 3)
    fresh = iresnet.ActNorm(2).to(device)
    fresh.load_state_dict(norm.state_dict())
    assert bool(fresh.initialized)


def test_squeeze_layout_and_round_trip(device):
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float64, device=device).view(2, 1, 4, 4)
    squeeze = iresnet.Squeeze()
    y, logdet = squeeze(x)
    assert y.shape == (2, 4, 2, 2)
    # channel k holds the pixels at offset (k // 2, k % 2) of each 2x2 patch
    torch.testing.assert_close(y[0, 1], x[0, 0, 0::2, 1::2])
    torch.testing.assert_close(y[0, 2], x[0, 0, 1::2, 0::2])
    torch.testing.assert_close(logdet, torch.zeros(2, dtype=torch.float64, device=device))
    torch.testing.assert_close(squeeze.inverse(y), x)
    with pytest.raises(ValueError, match="even H and W"):
        squeeze(torch.randn(1, 1, 3, 4, device=device))


@pytest.mark.parametrize("shape", [(4, 4, 4), (1, 4, 2, 2, 1), (1, 6, 2, 2)])
def test_squeeze_inverse_names_the_shape_it_takes(device, shape):
    """The audit: a 3-D input died in unpacking ("not enough values to unpack")."""
    with pytest.raises(ValueError, match=r"Squeeze.inverse input: expected \(batch, 4C, H, W\)"):
        iresnet.Squeeze().inverse(torch.randn(*shape, device=device))


def test_initialize_from_data_initialises_actnorm_and_nothing_else():
    """ActNorm takes its data-dependent initialisation; the random state, the power-iteration
    vectors, BatchNorm statistics and every module's mode are as before."""
    torch.manual_seed(0)
    g = nn.Sequential(
        iresnet.spectral_norm(nn.Linear(3, 8), 0.9), nn.ELU(), iresnet.spectral_norm(nn.Linear(8, 3), 0.9)
    )
    frozen = nn.BatchNorm1d(3).eval()  # a module deliberately left in eval mode
    model = iresnet.Sequential(iresnet.ActNorm(3), iresnet.ResidualBlock(g, "exact"))
    model.add_module("frozen", _Through(frozen))
    x = torch.randn(64, 3) * 5 + 2
    before = {k: v.clone() for k, v in model.state_dict().items() if "initialized" not in k}
    rng = torch.get_rng_state()
    iresnet.initialize_from_data(model, x)
    assert bool(model[0].initialized)
    torch.testing.assert_close(model[0](x)[0].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        if key in before and not key.startswith("0."):
            assert torch.equal(value, before[key]), key
    assert model.training and model[1].training and not frozen.training


class _Through(nn.Module):
    """Applies a module and returns a zero log-det: an invertible layer for the test's purpose."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module(x), x.new_zeros(x.shape[0])


def test_actnorm_reads_a_loaded_state_anew():
    """After load_state_dict of an uninitialised state, ActNorm initialises again at its next
    training call, although it had seen itself initialised before."""
    fresh = iresnet.ActNorm(2).state_dict()
    actnorm = iresnet.ActNorm(2)
    actnorm(torch.randn(16, 2) * 3 + 1)
    actnorm.load_state_dict(fresh)
    x = torch.randn(32, 2) * 7 - 4
    y, _ = actnorm(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(2), atol=1e-5, rtol=0)


def test_actnorm_initialises_exactly_far_from_the_origin(device):
    """The audit: a one-pass float32 variance gave an output std of 0.12 instead of 1 for data with
    mean 100 and std 0.01. Here mean 1000 and std 0.1: x^2 / var = 1e8, beyond float32's digits."""
    torch.manual_seed(0)
    norm = iresnet.ActNorm(3).to(device)
    x = 1000 + 0.1 * torch.randn(4096, 3, device=device)
    y, _ = norm(x)
    assert torch.allclose(
        y.double().std(0, unbiased=False), torch.ones(3, dtype=torch.float64, device=device), atol=2e-3
    )
    assert y.double().mean(0).abs().max() < 2e-3


@pytest.mark.parametrize("batch", [0, 1])
def test_actnorm_refuses_to_initialise_from_too_few_samples(device, batch):
    """The audit: an empty first batch left a NaN bias; one sample scaled by 1000 (1 / sqrt(eps))."""
    norm = iresnet.ActNorm(2).to(device)
    with pytest.raises(ValueError, match="at least 2 samples"):
        norm(torch.randn(batch, 2, device=device))
    assert not bool(norm.initialized)
    y, _ = norm(torch.randn(8, 2, device=device))  # the module still works once given a batch
    assert torch.isfinite(norm.bias).all() and torch.isfinite(y).all()


def test_actnorm_keeps_the_scale_of_a_constant_channel(device):
    norm = iresnet.ActNorm(2).double().to(device)
    x = torch.randn(16, 2, dtype=torch.float64, device=device)
    x[:, 1] = 5.0
    y, _ = norm(x)
    assert norm.log_scale[1].item() == 0.0
    torch.testing.assert_close(y[:, 1], torch.zeros(16, dtype=torch.float64, device=device))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_features": 0}, "num_features must be an integer of at least 1, got 0"),
        ({"num_features": -1}, "num_features must be an integer of at least 1, got -1"),
        ({"num_features": 2.5}, "num_features must be an integer of at least 1, got 2.5"),
        ({"num_features": 2, "eps": -1.0}, r"eps must be a number in \(0, inf\), got -1.0"),
        ({"num_features": 2, "eps": 0.0}, r"eps must be a number in \(0, inf\), got 0.0"),
        ({"num_features": 2, "eps": float("nan")}, r"eps must be a number in \(0, inf\), got nan"),
        ({"num_features": 2, "eps": float("inf")}, r"eps must be a number in \(0, inf\), got inf"),
    ],
)
def test_actnorm_refuses_a_bad_size_or_eps(arguments, message):
    """The audit: eps=-1 gave NaN scales silently, 0 features were accepted, -1 and 2.5 died in torch.zeros."""
    with pytest.raises(ValueError, match=message):
        iresnet.ActNorm(**arguments)


def test_injective_pad_refuses_what_it_cannot_pad_or_unpad(device):
    """The audit: inverse of 2 channels with extra=3 returned 1 channel, NaN went through, extra=1.5 was taken."""
    with pytest.raises(ValueError, match="extra must be an integer of at least 0, got 1.5"):
        iresnet.InjectivePad(1.5)
    pad = iresnet.InjectivePad(3)
    with pytest.raises(ValueError, match=r"InjectivePad.inverse input: expected \(batch, C \+ 3, H, W\) with C >= 1"):
        pad.inverse(torch.randn(1, 2, 2, 2, device=device))
    with pytest.raises(ValueError, match=r"InjectivePad.inverse input: expected \(batch, C \+ 3, H, W\)"):
        pad.inverse(torch.randn(1, 5, 2, device=device))
    with pytest.raises(NonFiniteInputError, match="InjectivePad input: 1 of 2 samples hold NaN or inf"):
        pad(torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), float("nan"))]).to(device))
    with pytest.raises(NonFiniteInputError, match="InjectivePad.inverse input"):
        pad.inverse(torch.full((1, 4, 2, 2), float("inf"), device=device))
