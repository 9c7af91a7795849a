"""Sequential: log-dets add up, the inverse runs in reverse, a missing log-det leaves none."""

from __future__ import annotations

import torch

import iresnet
from helpers import block_of, conv_branch, jacobian_logdet, mlp_branch


def test_sequential_sums_logdets_and_inverts_in_reverse(device):
    torch.manual_seed(2)
    model = (
        iresnet.Sequential(
            iresnet.ActNorm(4),
            block_of(mlp_branch(4, 0.9), device),
            iresnet.ActNorm(4),
            block_of(mlp_branch(4, 0.8), device),
        )
        .double()
        .to(device)
    )
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    model(x * 2 + 1)  # ActNorm initialisation
    model.eval()
    with torch.no_grad():
        model[0].log_scale.add_(0.5)
    y, logdet = model(x)
    torch.testing.assert_close(logdet, jacobian_logdet(model, x))
    torch.testing.assert_close(model.inverse(y), x, atol=1e-8, rtol=1e-8)


def test_sequential_with_squeeze_round_trips_images(device):
    model = (
        iresnet.Sequential(
            block_of(conv_branch(1, 8, 0.9), device),
            iresnet.Squeeze(),
            iresnet.ActNorm(4),
            block_of(conv_branch(4, 8, 0.9), device),
        )
        .double()
        .to(device)
    )
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, device=device)
    model(x)
    model.eval()
    iresnet.converge_spectral_norms(model)
    y, logdet = model(x)
    assert y.shape == (3, 4, 2, 2)
    torch.testing.assert_close(logdet, jacobian_logdet(model, x))
    torch.testing.assert_close(model.inverse(y), x, atol=1e-8, rtol=1e-8)


def test_sequential_logdet_is_none_if_any_layer_has_none(device):
    model = iresnet.Sequential(iresnet.ActNorm(2), iresnet.ResidualBlock(mlp_branch(2, 0.5), None)).to(device)
    _, logdet = model(torch.randn(3, 2, device=device))
    assert logdet is None
