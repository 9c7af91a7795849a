"""Property tests: every spectral-normalised residual block, and compositions with ActNorm and
Squeeze, inverts its forward pass and gives a finite per-sample log-det, across shapes, batch
sizes, coefficients, dtypes, log-det estimators and inversion methods."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import iresnet
from helpers import conv_branch, dense_branch

# Each example seeds torch from a drawn integer, so a failure reproduces from its report.
DENSE = settings(max_examples=40, deadline=None)
CONV = settings(max_examples=25, deadline=None)
TOL = {torch.float64: 1e-8, torch.float32: 1e-4}

seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([torch.float32, torch.float64])
coeffs = st.floats(0.3, 0.95)
estimators = st.sampled_from(["exact", "series", "roulette"])
methods = st.sampled_from(["fixed_point", "anderson"])
SETTINGS = dict(seed=seeds, dtype=dtypes, coeff=coeffs, estimator=estimators, method=methods)


def random_actnorm(channels: int) -> iresnet.ActNorm:
    """An initialised ActNorm with random scale in [e^-1, e] and random bias."""
    actnorm = iresnet.ActNorm(channels)
    with torch.no_grad():
        actnorm.log_scale.uniform_(-1, 1)
        actnorm.bias.normal_()
        actnorm.initialized.fill_(True)
    return actnorm


def prepared(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Move to x's device and dtype, run once (convs learn their input shape), converge the
    spectral norms and switch to eval mode."""
    model = model.to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        model(x)
    iresnet.converge_spectral_norms(model)
    return model.eval()


def assert_round_trip(model: nn.Module, x: torch.Tensor) -> None:
    """inverse(forward(x)) == x within the dtype's tolerance (relative to |x|), and the
    log-det is finite with shape (batch,)."""
    with torch.no_grad():
        y, logdet = model(x)
        x_back = model.inverse(y)
    assert y.dtype == x.dtype and x_back.shape == x.shape
    assert logdet is not None and logdet.shape == (x.shape[0],)
    assert torch.isfinite(logdet).all()
    tol = TOL[x.dtype]
    torch.testing.assert_close(x_back, x, atol=tol, rtol=tol)


@DENSE
@given(
    **SETTINGS,
    dim=st.integers(1, 6),
    hidden=st.integers(1, 32),
    batch=st.integers(1, 8),
)
def test_dense_block_round_trip(device, seed, dtype, coeff, estimator, method, dim, hidden, batch):
    """Dense residual blocks invert their forward pass."""
    torch.manual_seed(seed)
    x = torch.randn(batch, dim, dtype=dtype, device=device)
    block = iresnet.ResidualBlock(dense_branch(dim, hidden, coeff), estimator, inverse_method=method)
    assert_round_trip(prepared(block, x), x)


@CONV
@given(
    **SETTINGS,
    channels=st.integers(1, 3),
    hidden=st.integers(1, 8),
    height=st.integers(2, 6),
    width=st.integers(2, 6),
    batch=st.integers(1, 4),
)
def test_conv_block_round_trip(device, seed, dtype, coeff, estimator, method, channels, hidden, height, width, batch):
    """Convolutional residual blocks invert their forward pass on any small image size."""
    torch.manual_seed(seed)
    x = torch.randn(batch, channels, height, width, dtype=dtype, device=device)
    block = iresnet.ResidualBlock(conv_branch(channels, hidden, coeff), estimator, inverse_method=method)
    assert_round_trip(prepared(block, x), x)


@CONV
@given(
    **SETTINGS,
    channels=st.integers(1, 2),
    half_height=st.integers(1, 3),
    half_width=st.integers(1, 3),
    batch=st.integers(1, 4),
)
def test_multiscale_sequential_round_trip(
    device, seed, dtype, coeff, estimator, method, channels, half_height, half_width, batch
):
    """ActNorm -> block -> Squeeze -> ActNorm -> block inverts and sums finite log-dets."""
    torch.manual_seed(seed)
    x = torch.randn(batch, channels, 2 * half_height, 2 * half_width, dtype=dtype, device=device)
    model = iresnet.Sequential(
        random_actnorm(channels),
        iresnet.ResidualBlock(conv_branch(channels, 4, coeff), estimator, inverse_method=method),
        iresnet.Squeeze(),
        random_actnorm(4 * channels),
        iresnet.ResidualBlock(conv_branch(4 * channels, 8, coeff), estimator, inverse_method=method),
    )
    assert_round_trip(prepared(model, x), x)
