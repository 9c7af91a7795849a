"""Spectral normalisation and Lipschitz certificates, checked against dense operator matrices."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import iresnet
from iresnet.core.lipschitz import SpectralNorm


def dense_operator(layer: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of the linear part of ``layer`` at ``input_shape``, column by column."""
    n = torch.Size(input_shape).numel()
    weight = layer.weight.detach()
    basis = torch.eye(n, dtype=weight.dtype, device=weight.device).view(n, *input_shape)
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            out = basis @ weight.T
        else:
            out = F.conv2d(basis, weight, None, layer.stride, layer.padding, layer.dilation)
    return out.reshape(n, -1).T


def exact_norm(layer: nn.Module, input_shape: tuple[int, ...]) -> float:
    return torch.linalg.matrix_norm(dense_operator(layer, input_shape), ord=2).item()


def sigma_estimate(layer: nn.Module) -> float:
    p = layer.parametrizations.weight[0]
    return p.sigma(layer.parametrizations.weight.original).item()


@pytest.mark.parametrize("shape", [(3, 5), (7, 2), (16, 16)])
def test_linear_weight_is_scaled_to_coeff(device, shape):
    layer = nn.Linear(*shape).double().to(device)
    with torch.no_grad():
        layer.weight.mul_(5.0)  # well above the coefficient
    iresnet.spectral_norm(layer, coeff=0.8)
    layer(torch.randn(4, shape[0], dtype=torch.float64, device=device))
    assert exact_norm(layer, (shape[0],)) == pytest.approx(0.8, rel=1e-3)


def test_weight_below_coeff_is_left_alone(device):
    layer = nn.Linear(6, 6).double().to(device)
    with torch.no_grad():
        layer.weight.copy_(0.1 * torch.linalg.qr(layer.weight)[0])  # norm 0.1
    original = layer.weight.detach().clone()
    iresnet.spectral_norm(layer, coeff=0.9)
    torch.testing.assert_close(layer.weight, original)


@pytest.mark.parametrize(
    "conv_args, input_shape",
    [
        (dict(in_channels=2, out_channels=3, kernel_size=3, padding=1), (2, 5, 5)),
        (dict(in_channels=3, out_channels=2, kernel_size=3, padding=1, stride=2), (3, 6, 6)),
        (dict(in_channels=2, out_channels=2, kernel_size=3, padding=2, dilation=2), (2, 6, 5)),
        (dict(in_channels=2, out_channels=4, kernel_size=1), (2, 4, 4)),
    ],
)
def test_conv_power_iteration_runs_on_the_operator(device, conv_args, input_shape):
    """sigma converges to the norm of the convolution at the input size (with its stride,
    padding, dilation), not to the norm of the reshaped kernel."""
    conv = nn.Conv2d(**conv_args).double().to(device)
    operator = exact_norm(conv, input_shape)
    iresnet.spectral_norm(conv, coeff=100.0)  # no rescaling: we look at sigma alone
    conv(torch.randn(1, *input_shape, dtype=torch.float64, device=device))
    iresnet.converge_spectral_norms(conv, tolerance=1e-12)
    assert sigma_estimate(conv) == pytest.approx(operator, rel=1e-5)


def test_operator_norm_differs_from_reshaped_kernel_norm(device):
    """On a small input the operator norm of a padded conv is well below the circular norm and
    also unlike the reshaped-kernel norm: the distinction the power iteration must respect."""
    torch.manual_seed(3)
    conv = nn.Conv2d(1, 1, 3, padding=1, stride=2).double().to(device)
    kernel_norm = torch.linalg.matrix_norm(conv.weight.reshape(1, -1), ord=2).item()
    assert abs(exact_norm(conv, (1, 4, 4)) - kernel_norm) > 1e-3


def test_conv_normalised_to_coeff(device):
    conv = nn.Conv2d(3, 4, 3, padding=1).double().to(device)
    with torch.no_grad():
        conv.weight.mul_(10.0)
    iresnet.spectral_norm(conv, coeff=0.7, input_shape=(3, 6, 6))
    conv.eval()
    assert exact_norm(conv, (3, 6, 6)) == pytest.approx(0.7, rel=1e-3)


def test_eval_mode_freezes_the_vectors_while_the_weight_stays(device):
    layer = iresnet.spectral_norm(nn.Linear(5, 5).to(device), coeff=0.5)
    layer.eval()
    x = torch.randn(2, 5, device=device)
    first = layer(x)
    u = layer.parametrizations.weight[0].u.clone()
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
    torch.testing.assert_close(layer.parametrizations.weight[0].u, u, rtol=0, atol=0)  # no power iteration


def test_eval_mode_converges_for_a_changed_weight(device):
    """The audit's stale vectors: an eval-mode layer whose weight moved (an optimiser step, a
    loaded state dict) used to read sigma off the old vectors and certify up to 16x the coeff."""
    layer = iresnet.spectral_norm(nn.Linear(16, 16).double().to(device), coeff=0.5)
    layer.eval()
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(20).add_(torch.randn(16, 16, device=device, dtype=torch.float64))
    layer(torch.randn(2, 16, device=device, dtype=torch.float64))
    assert torch.linalg.matrix_norm(layer.weight, ord=2).item() <= 0.5


@pytest.mark.parametrize("fused", [False, True])
def test_an_optimiser_step_in_eval_mode_is_seen(device, fused):
    """A fused optimiser step (Adam(fused=True)) writes the weight without bumping its version,
    so an eval-mode layer used to keep its old vectors and exceed its coefficient; both kinds of
    step are now seen, and the weight obeys its coefficient after either."""
    torch.manual_seed(0)
    layer = iresnet.spectral_norm(nn.Linear(16, 16).to(device), coeff=0.5).eval()
    x = torch.randn(8, 16, device=device)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1.0, fused=fused)
    for _ in range(3):
        optimizer.zero_grad()
        layer(x).pow(2).sum().neg().backward()  # eval mode throughout: no power iteration in between
        optimizer.step()
        assert torch.linalg.matrix_norm(layer.weight.double(), ord=2).item() <= 0.5


@pytest.mark.parametrize("layer, input_shape", [(nn.Linear(8, 8), None), (nn.Conv2d(4, 4, 3, padding=1), (4, 40, 40))])
def test_a_non_finite_weight_is_named_not_a_lapack_error(device, layer, input_shape):
    """Both the eigensolve and Lanczos used to end in LAPACK's 'failed to converge'."""
    layer = iresnet.spectral_norm(layer.to(device), input_shape=input_shape).eval()
    with torch.no_grad():
        layer.parametrizations.weight.original.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"the weight holds NaN or inf \(1 of \d+ entries\)"):
        layer.weight


def test_training_forward_updates_vectors(device):
    layer = iresnet.spectral_norm(nn.Linear(5, 5).to(device), coeff=0.5)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.randn(5, 5, device=device))
    u = layer.parametrizations.weight[0].u.clone()
    layer(torch.randn(2, 5, device=device))
    assert not torch.allclose(layer.parametrizations.weight[0].u, u)


def test_converged_dense_layer_obeys_coeff_with_close_singular_values(device):
    """The audit: power iteration stopped by a small change per step sat below sigma when the top
    two singular values were close, and eval-mode layers reached 1.0007x the coeff."""
    left, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    singular = torch.linspace(4.0, 1.0, 32, dtype=torch.float64)
    singular[1] = 3.999
    layer = iresnet.spectral_norm(nn.Linear(32, 32).double().to(device), coeff=0.9)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_((left * singular) @ right.T)
    layer.eval()
    iresnet.converge_spectral_norms(layer)
    assert 0.9 * (1 - 1e-4) <= exact_norm(layer, (32,)) <= 0.9


def test_converged_large_conv_obeys_coeff(device):
    """An operator too large for the SVD (4 x 20 x 20 = 1600 entries) converges by Lanczos to
    its tolerance, and the eval-mode margin covers it."""
    conv = nn.Conv2d(4, 4, 3, padding=1).double().to(device)
    iresnet.spectral_norm(conv, coeff=0.8, input_shape=(4, 20, 20))
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(5).add_(0.3)
    conv.eval()
    steps = conv.parametrizations.weight[0].converge(conv.parametrizations.weight.original)
    assert steps > 0  # an iteration, not the SVD
    assert 0.8 * (1 - 1e-3) <= exact_norm(conv, (4, 20, 20)) <= 0.8


@pytest.mark.parametrize(
    "channels, kernel_size, input_shape",
    [((4, 32), 3, (4, 12, 12)), ((32, 4), 3, (32, 12, 12)), ((24, 24), 1, (24, 8, 8))],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converged_conv_with_close_singular_values_obeys_coeff(device, channels, kernel_size, input_shape, seed):
    """A trained faces model's audit: the top singular values of a convolution on a 12 x 12 map
    lie within 1e-5 of each other, power iteration stalled short of sigma, and float32 eval-mode
    weights reached 1.0005 times their coefficient. The converged weights, as float32 models
    use them, obey it against the exact SVD of the operator."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(*channels, kernel_size, padding=kernel_size // 2).to(device)
    iresnet.spectral_norm(conv, coeff=0.9, input_shape=input_shape)
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(3)
    conv.eval()
    iresnet.converge_spectral_norms(conv)
    float64 = nn.Conv2d(*channels, kernel_size, padding=kernel_size // 2, bias=False).double().to(device)
    with torch.no_grad():
        float64.weight.copy_(conv.weight)  # the float32 eval-mode weight, exactly
    assert 0.9 * (1 - 1e-4) <= exact_norm(float64, input_shape) <= 0.9


@pytest.mark.parametrize("krylov", [4, 16])
def test_lanczos_restarts_converge_to_the_norm(device, monkeypatch, krylov):
    """A Krylov basis capped (as memory caps it for large operators) restarts from its Ritz
    vector and still converges to the operator's norm, and says it converged (no warning)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 3, padding=1).double().to(device)
    iresnet.spectral_norm(conv, coeff=100.0, input_shape=(4, 12, 12))
    p = conv.parametrizations.weight[0]
    p.u.normal_()  # away from the converged vector
    monkeypatch.setattr("iresnet.core.lipschitz._KRYLOV_MAX_DIM", krylov)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps = p.converge(conv.parametrizations.weight.original, tolerance=1e-7, max_iter=5000)
    assert steps > krylov  # it restarted
    assert sigma_estimate(conv) == pytest.approx(exact_norm(conv, (4, 12, 12)), rel=1e-9)


def test_lanczos_that_runs_out_of_products_warns(device):
    conv = nn.Conv2d(4, 8, 3, padding=1).double().to(device)
    iresnet.spectral_norm(conv, coeff=100.0, input_shape=(4, 12, 12))
    with pytest.warns(RuntimeWarning, match="did not converge to 1e-12 in 3 steps"):
        conv.parametrizations.weight[0].converge(conv.parametrizations.weight.original, tolerance=1e-12, max_iter=3)


def test_converges_where_lapack_svd_fails(device):
    """A patches32 run stopped with a traceback at its final evaluation: LAPACK's SVD (gesdd) did
    not converge on the operator of this trained 1x1 kernel at 4 x 4 (1024 x 1024, every singular
    value repeated 16 times). The exact pair now comes from an eigensolve of the Gram matrix."""
    kernel = torch.from_numpy(np.load(Path(__file__).parent / "fixtures" / "svd_failing_kernel.npy"))
    conv = nn.Conv2d(64, 64, 1, bias=False).to(device)
    with torch.no_grad():
        conv.weight.copy_(kernel)
    float64 = nn.Conv2d(64, 64, 1, bias=False).double().to(device)
    with torch.no_grad():
        float64.weight.copy_(kernel)
    norm = exact_norm(float64, (64, 4, 4))  # svdvals converges where the full SVD does not
    iresnet.spectral_norm(conv, coeff=0.9, input_shape=(64, 4, 4))
    conv.eval()
    assert conv.parametrizations.weight[0].converge(conv.parametrizations.weight.original) == 0  # the exact pair
    with torch.no_grad():
        float64.weight.copy_(conv.weight)
    assert 0.9 * (1 - 1e-4) <= exact_norm(float64, (64, 4, 4)) <= 0.9 < norm
    assert iresnet.operator_norm_bound(float64, (64, 4, 4)) == pytest.approx(exact_norm(float64, (64, 4, 4)), rel=1e-10)


def test_certificate_survives_a_failing_svd(device, monkeypatch):
    """Where LAPACK's SVD fails, the certificate falls back to the Gram matrix's eigenvalues."""
    layer = nn.Linear(6, 4).double().to(device)
    expected = iresnet.operator_norm_bound(layer, (6,))

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "matrix_norm", failing)
    assert iresnet.operator_norm_bound(layer, (6,)) == pytest.approx(expected, rel=1e-10)


def test_conv_without_input_shape_raises_clear_error(device):
    conv = iresnet.spectral_norm(nn.Conv2d(2, 2, 3, padding=1).to(device))
    with pytest.raises(RuntimeError, match="input shape"):
        conv.weight
    with pytest.raises(RuntimeError, match="has not seen an input"):
        iresnet.converge_spectral_norms(conv)


def test_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.Linear or nn.Conv2d"):
        iresnet.spectral_norm(nn.Conv1d(2, 2, 3))
    with pytest.raises(ValueError, match="groups=1"):
        iresnet.spectral_norm(nn.Conv2d(2, 2, 3, groups=2))


def test_state_dict_round_trip_restores_conv_vectors(device):
    conv = iresnet.spectral_norm(nn.Conv2d(2, 3, 3, padding=1).to(device))
    conv(torch.randn(1, 2, 5, 7, device=device))
    fresh = iresnet.spectral_norm(nn.Conv2d(2, 3, 3, padding=1).to(device))
    fresh.load_state_dict(conv.state_dict())
    conv.eval(), fresh.eval()
    torch.testing.assert_close(fresh.weight, conv.weight)
    assert fresh.parametrizations.weight[0].input_shape == (2, 5, 7)


def test_remove_parametrizations_keeps_normalised_weight(device):
    layer = iresnet.spectral_norm(nn.Linear(4, 4).to(device), coeff=0.5)
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(10)
    layer.eval()
    iresnet.converge_spectral_norms(layer)
    weight = layer.weight.detach().clone()
    parametrize.remove_parametrizations(layer, "weight")
    assert isinstance(layer.weight, nn.Parameter)
    torch.testing.assert_close(layer.weight.detach(), weight)


def test_optimizer_and_compile_work(device):
    """Gradients reach the original weight, Adam steps, and torch.compile traces the layer."""
    layer = iresnet.spectral_norm(nn.Linear(4, 4).to(device), coeff=0.5)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    x = torch.randn(8, 4, device=device)
    before = layer.parametrizations.weight.original.detach().clone()
    layer(x).pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(before, layer.parametrizations.weight.original)
    layer.eval()
    compiled = torch.compile(layer, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


# Certificates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conv_args, input_shape",
    [
        (dict(in_channels=2, out_channels=3, kernel_size=3, padding=1), (2, 5, 5)),
        (dict(in_channels=3, out_channels=2, kernel_size=3, padding=1, stride=2), (3, 6, 6)),
        (dict(in_channels=2, out_channels=2, kernel_size=3, padding=2, dilation=2), (2, 6, 5)),
        (dict(in_channels=2, out_channels=2, kernel_size=3, padding=0), (2, 5, 5)),
        (dict(in_channels=2, out_channels=3, kernel_size=(3, 1), padding=(1, 0)), (2, 4, 3)),
    ],
)
def test_conv_bound_dominates_exact_operator_norm(device, conv_args, input_shape):
    """The circular (FFT) bound used for large maps is a true upper bound; on small maps the
    certificate is the exact operator norm."""
    conv = nn.Conv2d(**conv_args).double().to(device)
    circular = iresnet.circular_conv_bound(conv, input_shape)
    exact = exact_norm(conv, input_shape)
    assert exact <= circular * (1 + 1e-10)
    assert circular <= 2 * exact  # a certificate, but not a vacuous one
    assert iresnet.operator_norm_bound(conv, input_shape) == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("size", [3, 4, 7])
def test_circular_bound_is_exact_for_circular_convolution(device, size):
    """At the grid it uses, the FFT bound is the exact norm of the circular convolution."""
    conv = nn.Conv2d(2, 3, 3, padding=1).double().to(device)
    grid = size + 2
    n = 2 * grid * grid
    basis = torch.eye(n, dtype=torch.float64, device=device).view(n, 2, grid, grid)
    circular = F.conv2d(F.pad(basis, (1, 1, 1, 1), mode="circular"), conv.weight.detach())
    exact = torch.linalg.matrix_norm(circular.reshape(n, -1).T, ord=2).item()
    assert iresnet.circular_conv_bound(conv, (2, size, size)) == pytest.approx(exact, rel=1e-10)


def test_large_conv_certificate_bounds_the_converged_estimate(device):
    """Where both sides have over 4096 entries the certificate is the circular bound; it
    dominates the converged estimate of the exact operator norm, and is close to it on a 32 x 32 map."""
    conv = iresnet.spectral_norm(nn.Conv2d(5, 6, 3, padding=1).double().to(device), coeff=100.0)
    conv(torch.randn(1, 5, 32, 32, dtype=torch.float64, device=device))
    iresnet.converge_spectral_norms(conv, tolerance=1e-12)
    estimate = sigma_estimate(conv)
    bound = iresnet.operator_norm_bound(conv, (5, 32, 32))
    assert bound == iresnet.circular_conv_bound(conv, (5, 32, 32))
    assert estimate <= bound * (1 + 1e-10)
    assert bound <= 1.05 * estimate


@pytest.mark.parametrize(
    "conv_args, input_shape",
    [
        (dict(in_channels=3, out_channels=16, kernel_size=3, padding=1), (3, 16, 16)),  # the input side
        (dict(in_channels=16, out_channels=3, kernel_size=3, padding=1), (16, 16, 16)),  # the output side
        (dict(in_channels=16, out_channels=4, kernel_size=3, padding=2, dilation=2, stride=2), (16, 16, 16)),
        (dict(in_channels=8, out_channels=8, kernel_size=1), (8, 17, 17)),  # the kernel alone
    ],
)
def test_certificate_is_exact_beyond_the_dense_svd(device, conv_args, input_shape):
    """Above 2048 entries a convolution with a small side (or a 1 x 1 kernel) is certified by its
    exact norm: the certificate of a trained model's bottleneck convolutions is then its norm,
    not the circular bound 1-3 per cent above it."""
    torch.manual_seed(0)
    conv = nn.Conv2d(**conv_args).double().to(device)
    exact = exact_norm(conv, input_shape)
    assert iresnet.operator_norm_bound(conv, input_shape) == pytest.approx(exact, rel=1e-10)
    if conv.kernel_size != (1, 1):
        assert iresnet.conv_gram_norm(conv, input_shape) == pytest.approx(exact, rel=1e-10)
        assert iresnet.circular_conv_bound(conv, input_shape) > exact * (1 + 1e-3)  # what it replaces


def test_gram_norm_needs_zero_padding(device):
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect").to(device)
    with pytest.raises(ValueError, match="zero padding"):
        iresnet.conv_gram_norm(conv, (2, 8, 8))


def test_linear_bound_is_exact(device):
    layer = nn.Linear(5, 3).double().to(device)
    assert iresnet.operator_norm_bound(layer, (5,)) == pytest.approx(exact_norm(layer, (5,)), rel=1e-12)


def test_chain_bound_dominates_jacobian_norms(device):
    """The certificate is the product of exact layer norms and bounds every Jacobian."""
    g = (
        nn.Sequential(
            iresnet.spectral_norm(nn.Linear(3, 16), 0.9),
            iresnet.LipSwish(),
            nn.Sequential(iresnet.spectral_norm(nn.Linear(16, 16), 0.9), nn.ELU()),
            iresnet.spectral_norm(nn.Linear(16, 3), 0.9),
        )
        .double()
        .to(device)
    )
    g(torch.randn(1, 3, dtype=torch.float64, device=device))
    g.eval()
    bound = iresnet.lipschitz_bound(g, (3,))
    product = 1.0
    for layer in (g[0], g[2][0], g[3]):
        product *= exact_norm(layer, tuple(layer.weight.shape[1:]))
    assert bound == pytest.approx(product, rel=1e-10)
    for x in torch.randn(50, 3, dtype=torch.float64, device=device) * 3:
        jacobian = torch.autograd.functional.jacobian(lambda z: g(z[None])[0], x)
        assert torch.linalg.matrix_norm(jacobian, ord=2) <= bound * (1 + 1e-10)


def test_conv_chain_bound_tracks_shapes_through_strides(device):
    g = (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(4, 2, 3, padding=1),
        )
        .double()
        .to(device)
    )
    bound = iresnet.lipschitz_bound(g, (2, 8, 8))
    expected = exact_norm(g[0], (2, 8, 8)) * exact_norm(g[2], (4, 4, 4))
    assert bound == pytest.approx(expected, rel=1e-12)


def test_bound_does_not_touch_power_iteration(device):
    layer = iresnet.spectral_norm(nn.Linear(4, 4).to(device))
    u = layer.parametrizations.weight[0].u.clone()
    iresnet.lipschitz_bound(nn.Sequential(layer), (4,))
    torch.testing.assert_close(layer.parametrizations.weight[0].u, u)
    assert layer.training


def test_bound_refuses_unknown_activation(device):
    with pytest.raises(TypeError, match="cannot certify"):
        iresnet.lipschitz_bound(nn.Sequential(nn.Linear(2, 2), nn.Softplus(beta=5)).to(device), (2,))


@pytest.mark.parametrize(
    ("g", "input_shape", "takes", "reached"),
    [
        (nn.Sequential(nn.Linear(3, 8), nn.ELU(), nn.Linear(8, 3)), (4,), "Linear takes 3 features", (4,)),
        (nn.Sequential(nn.Linear(3, 8), nn.ELU(), nn.Linear(6, 3)), (3,), "Linear takes 6 features", (8,)),
        (iresnet.spectral_norm(nn.Linear(3, 3), 0.9), (4,), "Linear takes 3 features", (4,)),
        (nn.Conv2d(2, 2, 3, padding=1), (3, 4, 4), "Conv2d takes (2, H, W)", (3, 4, 4)),
        (nn.Conv2d(2, 2, 3, padding=1), (2, 4), "Conv2d takes (2, H, W)", (2, 4)),
    ],
)
def test_bound_refuses_an_input_shape_that_does_not_fit(g, input_shape, takes, reached):
    """The audit: a branch taking 3 features and input_shape (4,) gave torch's raw matmul error."""
    message = f"input_shape {input_shape} does not fit the branch: its {takes}, one input reaches it as {reached}"
    with pytest.raises(ValueError, match=re.escape(message)):
        iresnet.lipschitz_bound(g, input_shape)


@pytest.mark.parametrize("coeff", ["0.9", True, None, 0, -0.5, float("inf"), float("nan")])
def test_spectral_norm_refuses_a_coeff_that_is_not_a_positive_number(coeff):
    """The audit: '0.9' died comparing a str with 0, and True was taken as coefficient 1."""
    with pytest.raises(ValueError, match=rf"coeff must be a number in \(0, inf\), got {re.escape(repr(coeff))}"):
        iresnet.spectral_norm(nn.Linear(3, 3), coeff)


def test_spectral_norm_takes_a_numpy_coeff():
    """A coefficient read from a NumPy array is a number too (the stricter check refused it)."""
    np = pytest.importorskip("numpy")
    layer = iresnet.spectral_norm(nn.Linear(3, 3), np.float32(0.5)).eval()
    iresnet.converge_spectral_norms(layer)
    assert torch.linalg.matrix_norm(layer.weight.double(), 2) <= 0.5


def test_torch_func_grad_over_eval_mode_weights_uses_the_converged_vectors():
    """``torch.func.grad`` of ``functional_call`` over the parameters: inside the transform no
    buffer may be written (converging once died there); the vectors converged last serve, and the
    gradient is eval mode's own."""
    torch.manual_seed(0)
    g = nn.Sequential(
        iresnet.spectral_norm(nn.Linear(3, 8), 0.9), iresnet.LipSwish(), iresnet.spectral_norm(nn.Linear(8, 3), 0.9)
    )
    block = iresnet.ResidualBlock(g.double(), "exact").eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    block.train()(x)  # a training step moves the vectors: none are converged for the weights now
    block.eval()
    params, buffers = dict(block.named_parameters()), dict(block.named_buffers())
    with pytest.raises(RuntimeError, match=r"it has none .*converge_spectral_norms\(model\) in eval mode before"):
        torch.func.grad(lambda p: torch.func.functional_call(block, {**p, **buffers}, (x,))[1].sum())(params)
    block(x)  # converges in eval mode
    grads = torch.func.grad(lambda p: torch.func.functional_call(block, {**p, **buffers}, (x,))[1].sum())(params)
    expected = torch.autograd.grad(block(x)[1].sum(), list(params.values()), allow_unused=True)
    for name, reference in zip(params, expected):
        torch.testing.assert_close(grads[name], torch.zeros_like(grads[name]) if reference is None else reference)
    assert any(grads[name].abs().max() > 1e-3 for name in params)


def test_spectral_norm_class_is_a_parametrization():
    layer = iresnet.spectral_norm(nn.Linear(3, 3))
    assert isinstance(layer.parametrizations.weight[0], SpectralNorm)


def test_power_iteration_ignores_autocast():
    """A convolution's first call under bfloat16 autocast converges its norm estimate exactly as
    without autocast, its vectors in float32: a bf16 power iteration stops on rounding noise,
    several per cent below the norm."""
    estimates = []
    for autocast in (False, True):
        torch.manual_seed(0)
        conv = iresnet.spectral_norm(nn.Conv2d(4, 8, 3, padding=1), coeff=10.0)  # the scaling does not bind
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            conv(torch.randn(2, 4, 6, 6))
        p = conv.parametrizations.weight[0]
        assert p.u.dtype == p.v.dtype == torch.float32
        estimates.append(p.sigma(conv.parametrizations.weight.original).item())
    assert estimates[1] == estimates[0]
    assert estimates[0] == pytest.approx(iresnet.operator_norm_bound(conv, (4, 6, 6)), rel=5e-3)


def _true_conv_norm(conv: nn.Conv2d, input_shape: tuple[int, ...]) -> float:
    """The operator norm of the layer as it runs (padding mode included), bias removed."""
    n = torch.Size(input_shape).numel()
    basis = torch.eye(n, dtype=torch.float64).view(n, *input_shape)
    with torch.no_grad():
        columns = conv(basis) - conv(torch.zeros_like(basis[:1]))
    return torch.linalg.matrix_norm(columns.reshape(n, -1), ord=2).item()


@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
@pytest.mark.parametrize("size", [6, 24])  # 6: the exact SVD; 24: the bound for large operators
def test_bound_follows_the_padding_mode(mode, size):
    """The audit: lipschitz_bound certified 1.098 for a conv whose true norm was 1.18 (circular),
    1.40 (reflect) or 1.25 (replicate), because it ignored padding_mode."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode=mode).double()
    with torch.no_grad():
        conv.weight.abs_()  # positive kernels: the copied border entries add up
    shape = (2, size, size)
    truth = _true_conv_norm(conv, shape)
    bound = iresnet.lipschitz_bound(conv, shape)
    assert bound >= truth * (1 - 1e-9)
    if size == 6:
        assert bound == pytest.approx(truth, rel=1e-9)


def test_bound_refuses_a_sequential_with_its_own_forward():
    """The audit: a Sequential subclass that doubled its output was certified at 0.6 (truth 1.2)."""

    class Doubled(nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    g = Doubled(iresnet.spectral_norm(nn.Linear(3, 3), coeff=0.6))
    with pytest.raises(TypeError, match="Sequential subclass with its own forward"):
        iresnet.lipschitz_bound(g, (3,))
    assert iresnet.core.certificates.design_bound(g) is None


def test_bound_refuses_a_module_with_a_forward_hook():
    layer = nn.Linear(3, 3)
    layer.register_forward_hook(lambda module, args, out: 10 * out)
    with pytest.raises(TypeError, match="forward hooks"):
        iresnet.lipschitz_bound(nn.Sequential(layer, nn.ReLU()), (3,))


def test_design_bound_is_the_product_of_coefficients_and_activation_constants():
    g = nn.Sequential(
        iresnet.spectral_norm(nn.Linear(2, 4), coeff=0.9),
        nn.ELU(alpha=1.5),
        iresnet.spectral_norm(nn.Linear(4, 2), coeff=0.5),
    )
    assert iresnet.core.certificates.design_bound(g) == pytest.approx(0.9 * 1.5 * 0.5)
    assert iresnet.core.certificates.design_bound(nn.Sequential(nn.Linear(2, 2))) is None  # not normalised: no promise


def test_eval_mode_model_certifies_and_samples_after_weights_moved_without_converging(device):
    """The audit: an eval-mode block with stale vectors certified Lip(g) = 16, and
    DensityModel.sample did not converge the norms first."""
    from iresnet.models import toy_flow

    torch.manual_seed(0)
    model = toy_flow(2, blocks=2, hidden=16, coeff=0.9).double().to(device)
    model(torch.randn(64, 2, dtype=torch.float64, device=device))  # ActNorm's initialisation
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("original"):
                p.mul_(20).add_(torch.randn_like(p))  # far from where the vectors converged
    for block in model.transform:
        if isinstance(block, iresnet.ResidualBlock):
            assert iresnet.lipschitz_bound(block.g, (2,)) <= 0.9**3
    x = model.sample(32)
    z, _ = model.transform(x)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(model.transform.inverse(z), x)


def test_a_layer_built_and_loaded_in_inference_mode_works():
    """The review: inference tensors have no version counter, and the staleness check read it."""
    with torch.inference_mode():
        layer = iresnet.spectral_norm(nn.Linear(4, 4), coeff=0.9).eval()
        layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
        assert layer(torch.randn(2, 4)).shape == (2, 4)
        assert torch.linalg.matrix_norm(layer.weight.double(), ord=2) <= 0.9
