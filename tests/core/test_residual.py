"""Residual blocks: the inverse and its errors, the refusal of a branch that may expand, inputs that do not fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import iresnet
from helpers import block_of, conv_branch, dense_branch, mlp_branch
from iresnet.models import toy_flow


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_dense_inverse_round_trip(device, dtype, tol, method):
    block = block_of(mlp_branch(4, 0.95), device, dtype, inverse_method=method)
    x = torch.randn(64, 4, dtype=dtype, device=device) * 3
    y, _ = block(x)
    torch.testing.assert_close(block.inverse(y), x, atol=tol, rtol=tol)
    assert block.last_inversion.method == method


@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_conv_inverse_round_trip(device, method):
    block = block_of(conv_branch(3, 8, 0.9), device, inverse_method=method)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64, device=device)
    block(x)
    block.eval()
    iresnet.converge_spectral_norms(block)
    y, _ = block(x)
    torch.testing.assert_close(block.inverse(y), x, atol=1e-8, rtol=1e-8)


def test_inverse_in_training_mode_inverts_the_forward_just_run(device):
    """The inverse freezes the power iteration, so it inverts the very function the training
    forward pass applied."""
    block = block_of(mlp_branch(3, 0.9), device)
    block.train()
    x = torch.randn(16, 3, dtype=torch.float64, device=device)
    y, _ = block(x)
    torch.testing.assert_close(block.inverse(y.detach()), x, atol=1e-8, rtol=1e-8)


def test_anderson_needs_fewer_evaluations(device):
    """With J_g close to -0.98 I the plain iteration contracts slowly; Anderson reaches the
    same tolerance with fewer evaluations of g."""
    first, second = nn.Linear(8, 64), nn.Linear(64, 8)
    with torch.no_grad():
        first.weight.copy_(torch.linalg.qr(torch.randn(64, 8))[0])
        first.bias.fill_(2.0)  # mostly in the linear part of the ELU
        second.weight.copy_(-first.weight.T)
    g = nn.Sequential(iresnet.spectral_norm(first, 0.99), nn.ELU(), iresnet.spectral_norm(second, 0.99))
    block = block_of(g, device, max_iter=5000)
    x = torch.randn(128, 8, dtype=torch.float64, device=device)
    y, _ = block(x)
    plain = block.inverse(y, method="fixed_point")
    plain_report = block.last_inversion
    accelerated = block.inverse(y, method="anderson")
    anderson_report = block.last_inversion
    torch.testing.assert_close(plain, x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(accelerated, x, atol=1e-8, rtol=1e-8)
    assert anderson_report.evaluations < plain_report.evaluations
    assert anderson_report.sample_evaluations < plain_report.sample_evaluations
    assert anderson_report.max_residual <= 1e-10 * (1 + y.abs().max().item())


def test_per_sample_stopping(device):
    """Samples that converge early stop being evaluated."""
    block = block_of(mlp_branch(2, 0.9), device)
    y = torch.cat([torch.zeros(1, 2), 50 * torch.ones(1, 2)]).to(device=device, dtype=torch.float64)
    block.inverse(y)
    report = block.last_inversion
    assert report.sample_evaluations < 2 * report.iterations


def _linear_block(device, scale: float) -> iresnet.ResidualBlock:
    """g(x) = scale * x, with Lip(g) = |scale|."""
    g = nn.Linear(2, 2, bias=False).double().to(device)
    with torch.no_grad():
        g.weight.copy_(scale * torch.eye(2))
    return iresnet.ResidualBlock(g, None, max_iter=20)


def test_expanding_branch_diverges_and_raises(device):
    """g(x) = -1.5 x: the Banach iteration x <- y + 1.5 x runs away."""
    block = _linear_block(device, -1.5)
    with pytest.raises(iresnet.InversionError, match=r"failed for 5 of 5 samples after 20 iterations"):
        block.inverse(torch.randn(5, 2, dtype=torch.float64, device=device))


@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_singular_map_raises(device, method):
    """g(x) = -x maps everything to 0: no preimage exists and neither solver may pretend."""
    block = _linear_block(device, -1.0)
    with pytest.raises(iresnet.InversionError, match=r"(failed for 5 of 5 samples after 20 iterations|diverged)"):
        block.inverse(torch.randn(5, 2, dtype=torch.float64, device=device), method=method)


def test_iteration_cap_names_samples_residuals_and_iterations(device):
    block = block_of(mlp_branch(2, 0.99), device, max_iter=3)
    y, _ = block(torch.randn(4, 2, dtype=torch.float64, device=device) * 5)
    with pytest.raises(
        iresnet.InversionError, match=r"failed for 4 of 4 samples after 3 iterations: their updates are [0-9.e-]+"
    ):
        block.inverse(y)


def test_inverse_is_differentiable_by_implicit_function_theorem(device):
    block = block_of(mlp_branch(3, 0.9, hidden=8), device)
    block.eval()
    y = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(block.inverse, (y,), atol=1e-7)
    inverse = InverseOf(block)
    names = [name for name, _ in inverse.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in inverse.parameters())

    def inverse_of(*values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(inverse, dict(zip(names, values)), (y.detach(),))

    assert torch.autograd.gradcheck(inverse_of, params, atol=1e-7)


def test_gradient_with_respect_to_an_inverse_is_not_transformed(device):
    """The implicit gradient acts on the way from the solution to ``y`` and the parameters; the
    gradient of a function of the solution with respect to the solution itself is plain (it
    once came back multiplied by (I + J_g)^-T)."""
    block = block_of(mlp_branch(3, 0.9, hidden=8), device).eval()
    y = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    x = block.inverse(y)
    (along_x,) = torch.autograd.grad(x.pow(2).sum(), x, retain_graph=True)
    torch.testing.assert_close(along_x, 2 * x.detach())
    (along_y,) = torch.autograd.grad(x.pow(2).sum(), y)  # still through the implicit gradient
    jacobians = torch.stack([torch.autograd.functional.jacobian(lambda s: block(s[None])[0][0], s) for s in x.detach()])
    expected = torch.linalg.solve(jacobians.transpose(1, 2), 2 * x.detach())  # J_F^-T (2x)
    torch.testing.assert_close(along_y, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("efficient", [False, True], ids=["series", "series-efficient"])
def test_logdet_on_the_autograd_path_of_an_inverse_is_that_of_its_value(device, efficient):
    """A series on the autograd path differentiates ``g`` at its input: an input that carries the
    inverse's implicit gradient (or any hook) must give the log-det and gradients of its value."""
    g = nn.Sequential(
        iresnet.spectral_norm(nn.Linear(3, 8), 0.7), nn.Tanh(), iresnet.spectral_norm(nn.Linear(8, 3), 0.7)
    )
    series = iresnet.PowerSeries(n_terms=60, probe="basis", memory_efficient=efficient)
    block = iresnet.ResidualBlock(g.to(device=device, dtype=torch.float64), series).eval()
    assert block.jacobian_path == "autograd"  # Tanh has no explicit products
    y = torch.randn(5, 3, dtype=torch.float64, device=device)
    results = []
    for attached in (True, False):
        y_in = y.clone().requires_grad_()
        x = block.inverse(y_in)
        x_in = x if attached else x.detach().requires_grad_()
        _, logdet = block(x_in)
        (along_x,) = torch.autograd.grad(logdet.sum(), x_in, retain_graph=True)
        results.append((logdet.detach(), along_x))
        x.register_hook(lambda grad: 100 * grad)  # a user's hook on the input changes nothing either
        torch.testing.assert_close(block(x)[1].detach(), logdet.detach())
    (value, along_x), (reference, reference_along_x) = results
    with torch.no_grad():
        exact = iresnet.ResidualBlock(block.g, "exact")(x_in.detach())[1]
    torch.testing.assert_close(reference, exact, rtol=1e-10, atol=1e-10)  # 60 terms: exact in float64
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(along_x, reference_along_x, rtol=1e-10, atol=1e-12)


class InverseOf(nn.Module):
    """A module whose forward is a block's inverse, for functional_call over its parameters."""

    def __init__(self, block: iresnet.ResidualBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.block.inverse(y)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.randn(4, 3, dtype=torch.float64), r"expected shape \(batch, 2\)"),
        (torch.randn(2, dtype=torch.float64), r"expected a batch of shape"),
        (torch.randn(4, 2, dtype=torch.float32), "expected dtype torch.float64"),
        (torch.ones(4, 2, dtype=torch.int64), "floating-point"),
        (torch.tensor([[0.0, float("nan")], [1.0, 1.0]], dtype=torch.float64), "1 of 2 samples hold NaN or inf"),
        (
            torch.tensor([[0.0, float("inf")], [1.0, -float("inf")]], dtype=torch.float64),
            "2 of 2 samples hold NaN or inf",
        ),
    ],
)
def test_bad_input_gets_clear_value_error(device, bad, message):
    block = block_of(mlp_branch(2, 0.9), device)
    block(torch.randn(3, 2, dtype=torch.float64, device=device))
    bad = bad.to(device)
    with pytest.raises(ValueError, match=message):
        block(bad)
    with pytest.raises(ValueError, match=message):
        block.inverse(bad)


def test_branch_that_changes_shape_is_rejected(device):
    block = iresnet.ResidualBlock(nn.Linear(3, 2).to(device), "exact")
    with pytest.raises(ValueError, match="must keep the shape"):
        block(torch.randn(2, 3, device=device))


def test_logdet_none_returns_none(device):
    block = iresnet.ResidualBlock(mlp_branch(2, 0.9).to(device), None)
    y, logdet = block(torch.randn(3, 2, device=device))
    assert logdet is None and y.shape == (3, 2)


@pytest.mark.parametrize("coeff", [1.0, 1.5])
def test_block_refuses_a_branch_allowed_to_expand(coeff):
    """The audit: coeff 1.5 was accepted, every block's certified Lip(g) was 1.8-3.4, and the series
    returned -2.944 where the exact log-det was -1.567."""
    g = nn.Sequential(
        iresnet.spectral_norm(nn.Linear(2, 8), coeff), iresnet.LipSwish(), iresnet.spectral_norm(nn.Linear(8, 2), coeff)
    )
    with pytest.raises(ValueError, match="Lip\\(g\\) < 1"):
        iresnet.ResidualBlock(g)
    with pytest.raises(ValueError, match="coeff"):  # the builders name the option first
        toy_flow(2, blocks=1, hidden=8, coeff=coeff)
    iresnet.ResidualBlock(nn.Sequential(iresnet.spectral_norm(nn.Linear(2, 2), 0.99)))  # just below 1 is a flow


@pytest.mark.parametrize("shape", [(3, 5), (3, 2, 3), (3, 1, 4, 4)])
def test_fresh_dense_block_names_a_wrong_shape(shape, device):
    """The audit: a fresh block passed torch's 'mat1 and mat2 shapes cannot be multiplied' on."""
    block = iresnet.ResidualBlock(dense_branch(2, 8, 0.9).to(device))
    with pytest.raises(ValueError, match="does not fit the branch"):
        block(torch.randn(*shape, device=device))
    assert block.event_shape is None  # nothing learned from the refused input
    block(torch.randn(3, 2, device=device))


def test_fresh_conv_block_names_a_wrong_channel_count(device):
    block = iresnet.ResidualBlock(conv_branch(3, 8, 0.9).to(device))
    with pytest.raises(ValueError, match="first Conv2d takes \\(batch, 3, H, W\\)"):
        block(torch.randn(2, 4, 6, 6, device=device))


@pytest.mark.parametrize("event_shape", [3, (3.0,), (0,), (), "3"])
def test_block_refuses_an_event_shape_that_is_not_a_shape(event_shape):
    """The audit: event_shape=3 gave "'int' object is not iterable"."""
    with pytest.raises(ValueError, match=r"event_shape must be a tuple of integers of at least 1, .* \(such as \(3,\)"):
        iresnet.ResidualBlock(dense_branch(3, 8, 0.9), event_shape=event_shape)
    assert iresnet.ResidualBlock(dense_branch(3, 8, 0.9), event_shape=[3]).event_shape == (3,)


def test_block_refuses_a_branch_that_is_not_a_module():
    """The audit: a lambda gave "'function' object has no attribute '_forward_hooks'"."""
    with pytest.raises(TypeError, match="g must be an nn.Module .* got function"):
        iresnet.ResidualBlock(lambda x: 0.5 * x)


def test_anderson_warns_when_the_iterates_prove_g_expanding(device):
    """The audit: Anderson returned a root for a non-contractive g without a word."""
    g = nn.Linear(3, 3, bias=False).double().to(device)
    with torch.no_grad():
        g.weight.copy_(-1.5 * torch.eye(3, dtype=torch.float64))  # Lip(g) = 1.5; x + g(x) = -x / 2
    y = torch.randn(4, 3, dtype=torch.float64, device=device)
    with pytest.warns(RuntimeWarning, match="stretched the distance between two iterates by 1.5"):
        x, _ = iresnet.solve_fixed_point(g, y, "anderson")
    torch.testing.assert_close(x, -2 * y)


@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_inverse_of_a_contraction_does_not_warn(method, device):
    import warnings

    torch.manual_seed(0)
    g = dense_branch(3, 16, 0.99, depth=1).double().to(device)
    y = 5 * torch.randn(64, 3, dtype=torch.float64, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iresnet.solve_fixed_point(g, y, method)


def test_first_inverse_at_a_new_conv_size_inverts_the_forward():
    """The review: a block's first call being an inverse at another input size than its convolution's
    spectral norm was set for cached the weight of the old size."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(5)
    g = nn.Sequential(iresnet.spectral_norm(conv, 0.9, input_shape=(2, 2, 2))).double().eval()
    block = iresnet.ResidualBlock(g, None)
    y = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(block(block.inverse(y))[0], y, rtol=1e-8, atol=1e-8)


def test_no_stretch_warning_for_a_contraction_far_from_the_origin():
    """The review: an elementwise test of 'apart' let rounding in large iterates pass for a stretch."""
    import warnings

    torch.manual_seed(0)
    orthogonal, _ = torch.linalg.qr(torch.randn(128, 128))
    linear = nn.Linear(128, 128)
    with torch.no_grad():
        linear.weight.copy_(-orthogonal)  # every singular value 0.99 once normalised
    g = nn.Sequential(iresnet.spectral_norm(linear, 0.99)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iresnet.solve_fixed_point(g, 100 * torch.randn(64, 128), "anderson", max_iter=200_000)
