"""The monotone (Cayley) block, :class:`iresnet.MonotoneBlock`, in float64.

Proven here, each against a reference computed without the block's own log-det code:

* its log-det by every estimator (Exact on both Jacobian paths, PowerSeries with basis probes)
  is that of the brute-force Jacobian of ``x -> F(x)`` (autograd through the solve), on dense
  and convolutional branches whose spectral normalisation binds;
* that Jacobian is the Cayley transform :math:`(I - J_g(w))(I + J_g(w))^{-1}` at
  :math:`w = (x + F(x)) / \\sqrt 2`, and a truncated series is biased by exactly its odd tail
  :math:`-2 \\sum_{k > n, k \\text{ odd}} \\mathrm{tr}(J_g^k) / k`;
* Roulette (geometric and Poisson, Gaussian probes) is unbiased: its mean over many draws is
  within 4 standard errors of the exact log-det, which the first terms alone miss;
* the inverse undoes the forward pass to 1e-8 by both solvers, reports its iterations, and
  raises :class:`iresnet.InversionError` when ``max_iter`` is too small;
* gradients through the implicit differentiation of the solve pass ``gradcheck`` (output and
  log-det, input and parameters), and the Neumann (memory-efficient) gradient of a series with
  exact traces on the explicit path equals the gradient of the Exact log-det;
* the Jacobian's singular values lie in :math:`[(1 - L)/(1 + L), (1 + L)/(1 - L)]` for the
  certified :math:`L \\ge \\mathrm{Lip}(g)`, and the block exceeds a residual block's cap
  :math:`1 + L`;
* in training mode the inverse inverts the function the forward pass applied, whose log-det
  belongs to the same weights (one power-iteration step for the solve and the log-det);
* a short optimisation of a toy likelihood through the solves decreases it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import iresnet
from helpers import binding, conv_branch, dense_branch, jacobian_logdet
from iresnet.core.lipschitz import frozen_power_iteration, spectral_norms

DTYPE = torch.float64
ROOT2 = math.sqrt(2)


def make_block(
    estimator, dim: int = 3, coeff: float = 0.9, conv: bool = False, hidden: int | None = None, **options
) -> iresnet.MonotoneBlock:
    """A monotone block on a binding branch, run once (convolutions learn the input size),
    its spectral norms converged, in eval mode: one fixed function."""
    g = conv_branch(dim, hidden or 4, coeff) if conv else dense_branch(dim, hidden or 16, coeff)
    block = iresnet.MonotoneBlock(binding(g).to(DTYPE), estimator, **options)
    with torch.no_grad():
        block(torch.randn(2, *event_shape(dim, conv), dtype=DTYPE))
    block.eval()
    iresnet.converge_spectral_norms(block)
    return block


def event_shape(dim: int, conv: bool) -> tuple[int, ...]:
    return (dim, 4, 4) if conv else (dim,)


def branch_jacobians(g: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """J_g at each sample of ``w``, ``(batch, d, d)``, by autograd."""
    d = w[0].numel()
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda s: g(s[None])[0], s).reshape(d, d) for s in w.detach()]
    )


def block_jacobians(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J_F at each sample of ``x``, ``(batch, d, d)``, by autograd through the block's solve."""
    d = x[0].numel()
    return torch.stack([torch.autograd.functional.jacobian(lambda s: block(s[None])[0][0], s).reshape(d, d) for s in x])


def cayley_tail(jac: torch.Tensor, start: int, stop: int = 400) -> torch.Tensor:
    """-2 sum_{start <= k < stop, k odd} tr(J^k) / k per sample."""
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype).expand_as(jac)
    power, total = eye, torch.zeros(jac.shape[0], dtype=jac.dtype)
    for k in range(1, stop):
        power = power @ jac
        if k >= start and k % 2:
            total = total - 2 * power.diagonal(dim1=1, dim2=2).sum(1) / k
    return total


def near_identity_branch(dim: int, coeff: float) -> nn.Sequential:
    """A spectral-normalised linear map near ``coeff * I`` (the normalisation binds, converged)."""
    linear = nn.Linear(dim, dim)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(dim) + 0.1 * torch.randn(dim, dim))
    g = binding(nn.Sequential(iresnet.spectral_norm(linear, coeff))).to(DTYPE)
    g.eval()
    iresnet.converge_spectral_norms(g)
    return g


# 1. The log-det by every estimator against the brute-force Jacobian ------------------------------

ESTIMATORS = {
    "exact-autograd": (lambda conv: iresnet.Exact(), "autograd"),
    "exact-explicit": (lambda conv: iresnet.Exact(), "explicit"),
    "series-basis-autograd": (lambda conv: iresnet.PowerSeries(n_terms=71 if conv else 101, probe="basis"), "autograd"),
    "series-basis-explicit": (lambda conv: iresnet.PowerSeries(n_terms=71 if conv else 101, probe="basis"), "explicit"),
}


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("conv", [False, True], ids=["dense", "conv"])
@pytest.mark.parametrize("name", ESTIMATORS)
def test_logdet_is_that_of_the_brute_force_jacobian(name: str, conv: bool, grad: bool) -> None:
    """Lip(g) <= 0.81 (dense, d = 4) or 0.73 (conv, d = 32): 101 or 71 series terms leave less than
    d L^n / n < 1e-10 untold. With grad mode on as in training, where the solve's implicit gradient
    hangs on the solution the estimator differentiates (it once transformed the estimator's
    vector-Jacobian products too)."""
    build, jacobian = ESTIMATORS[name]
    block = make_block(build(conv), dim=2 if conv else 4, conv=conv, jacobian=jacobian)
    assert block.jacobian_path == jacobian
    x = 2 * torch.randn(3, *block.event_shape, dtype=DTYPE)
    with torch.set_grad_enabled(grad):
        _, logdet = block(x)
    reference = jacobian_logdet(block, x)
    assert reference.abs().max() > 0.05  # not trivially zero
    torch.testing.assert_close(logdet.detach(), reference, rtol=1e-8, atol=1e-8)


def test_jacobian_is_the_cayley_transform_of_the_branch() -> None:
    """J_F(x) = (I - J_g(w))(I + J_g(w))^{-1} with w = (x + F(x)) / sqrt2 (from w + g(w) = sqrt2 x
    and w - g(w) = sqrt2 F(x)): the forward pass and its implicit gradient solve the right
    equation, not merely an invertible one."""
    block = make_block("exact", dim=3)
    x = 2 * torch.randn(4, 3, dtype=DTYPE)
    with torch.no_grad():
        y, _ = block(x)
    w = (x + y) / ROOT2
    torch.testing.assert_close(w + block.g(w), ROOT2 * x, rtol=1e-9, atol=1e-9)
    jac = branch_jacobians(block.g, w)
    eye = torch.eye(3, dtype=DTYPE).expand_as(jac)
    expected = (eye - jac) @ torch.linalg.inv(eye + jac)
    torch.testing.assert_close(block_jacobians(block, x), expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("jacobian", ["autograd", "explicit"])
def test_truncated_series_is_biased_by_its_odd_tail(jacobian: str) -> None:
    """The first term alone, -2 tr(J_g), of a strongly contractive branch (coeff 0.97) misses the
    log-det measurably, by exactly -2 sum_{k >= 3 odd} tr(J_g^k) / k: a test of the other
    estimators against the exact log-det can tell a truncation from the truth, and the series
    has the Cayley coefficients (no even terms, the odd ones doubled and negated)."""
    block = make_block(iresnet.PowerSeries(n_terms=2, probe="basis"), dim=4, coeff=0.97, jacobian=jacobian)
    x = 2 * torch.randn(5, 4, dtype=DTYPE)
    with torch.no_grad():
        y, estimate = block(x)
    jac = branch_jacobians(block.g, (x + y) / ROOT2)
    exact = jacobian_logdet(block, x)
    tail = cayley_tail(jac, start=3)
    torch.testing.assert_close(exact - estimate, tail, rtol=0, atol=1e-10)
    assert tail.abs().min() > 1e-6  # every sample biased, far above the tolerances used here


# 2. Unbiasedness of the Russian roulette ------------------------------------------------------


ROULETTES = {  # the estimator, and the copies of each sample in the batch
    "geometric": (iresnet.Roulette(n_exact_terms=1, p=0.3, probe="gaussian"), 32),
    "poisson": (iresnet.Roulette(n_exact_terms=1, distribution="poisson", rate=3.0, probe="gaussian"), 32),
    "geometric-basis": (iresnet.Roulette(n_exact_terms=1, p=0.3, n_probes=16, probe="basis"), 1),
}


@pytest.mark.parametrize("name", ROULETTES)
def test_roulette_is_unbiased(name: str) -> None:
    """Every probe of a forward pass draws its own tail length, shared by the batch; a Gaussian
    probe is drawn for each sample. Each sample is repeated ``copies`` times in the batch, so the
    300 forward passes are independent draws of the mean over copies and probes. Their mean is within 4
    standard errors of the exact log-det, while the first term alone is more than 4 standard
    errors away. The branch is a linear map near 0.6 I (spectral-normalised, binding): the
    series' tail is large, and its variance under the roulette's reweighting finite. With basis
    probes only the tail lengths are random: the standard error is about 1% of the tail, so
    tail weights wrong by a few per cent fail."""
    estimator, copies = ROULETTES[name]
    draws_count = 300
    block = iresnet.MonotoneBlock(near_identity_branch(3, 0.6), estimator).eval()
    x = 2 * torch.randn(3, 3, dtype=DTYPE)
    exact = jacobian_logdet(block, x)
    with torch.no_grad():
        draws = torch.stack([block(x.repeat(copies, 1))[1].view(copies, 3).mean(0) for _ in range(draws_count)])
        block.logdet = iresnet.PowerSeries(n_terms=1, probe="basis")
        first_term = block(x)[1]
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(draws_count)
    assert ((mean - exact).abs() <= 4 * stderr).all(), (mean, exact, stderr)
    assert ((first_term - exact).abs() > 4 * stderr).all(), (first_term, exact, stderr)  # the check has teeth


# 3. The inverse ---------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [False, True], ids=["dense", "conv"])
@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_inverse_undoes_forward_and_reports(method: str, conv: bool) -> None:
    block = make_block("exact", dim=2 if conv else 4, conv=conv, coeff=0.95, inverse_method=method, max_iter=500)
    x = 3 * torch.randn(6, *block.event_shape, dtype=DTYPE)
    with torch.no_grad():
        y, _ = block(x)
        forward_report = block.last_inversion
        x_back = block.inverse(y)
    inverse_report = block.last_inversion
    torch.testing.assert_close(x_back, x, rtol=1e-8, atol=1e-8)
    for report in (forward_report, inverse_report):
        assert report is not None and report.method == method
        assert 1 < report.iterations <= 500 and report.evaluations >= report.iterations
        assert report.max_residual <= 1e-9 * (1 + y.abs().max().item())
    assert inverse_report is not forward_report
    other = "anderson" if method == "fixed_point" else "fixed_point"
    torch.testing.assert_close(block.inverse(y, method=other), x, rtol=1e-8, atol=1e-8)
    assert block.last_inversion.method == other


def test_stretching_inverse_is_exact_for_a_linear_branch() -> None:
    """g = -0.8 I: F = 9 I, and both solves (w + g(w) = sqrt2 x, w - g(w) = sqrt2 y) converge."""
    g = nn.Linear(3, 3, bias=False).to(DTYPE)
    with torch.no_grad():
        g.weight.copy_(-0.8 * torch.eye(3, dtype=DTYPE))
    block = iresnet.MonotoneBlock(g, "exact", max_iter=500)
    x = torch.randn(4, 3, dtype=DTYPE)
    y, logdet = block(x)
    torch.testing.assert_close(y, 9 * x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logdet, torch.full((4,), 3 * math.log(9), dtype=DTYPE))
    torch.testing.assert_close(block.inverse(y), x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_too_few_iterations_raise(method: str) -> None:
    block = make_block("exact", dim=3, coeff=0.95, inverse_method=method)
    x = 3 * torch.randn(4, 3, dtype=DTYPE)
    with torch.no_grad():
        y, _ = block(x)
    block.max_iter = 2
    with pytest.raises(iresnet.InversionError, match="after 2 iterations"):
        block(x)
    with pytest.raises(iresnet.InversionError, match="after 2 iterations"):
        block.inverse(y)


# 4. Gradients through the implicit differentiation ---------------------------------------------


@pytest.mark.parametrize("jacobian", ["autograd", "explicit"])
def test_gradcheck_input(jacobian: str) -> None:
    block = make_block("exact", dim=2, hidden=6, jacobian=jacobian)
    x = torch.randn(3, 2, dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), atol=1e-6)
    y = block(x)[0].detach().requires_grad_()  # the inverse's solve, w - g(w) = sqrt2 y: the other sign
    assert torch.autograd.gradcheck(block.inverse, (y,), atol=1e-6)


@pytest.mark.parametrize("jacobian", ["autograd", "explicit"])
def test_gradcheck_parameters(jacobian: str) -> None:
    """Through the solve's implicit gradient and the log-det, for every parameter (the spectral
    norm's weights included: eval mode reconverges a changed weight exactly)."""
    block = make_block("exact", dim=2, hidden=4, jacobian=jacobian)
    x = torch.randn(3, 2, dtype=DTYPE)
    names = [name for name, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())

    def forward(*values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.func.functional_call(block, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(forward, params, atol=1e-6)


@pytest.mark.parametrize(
    "efficient",
    [
        iresnet.PowerSeries(n_terms=61, probe="basis", memory_efficient=True),
        iresnet.Roulette(n_exact_terms=61, p=0.5, probe="basis", memory_efficient=True),
    ],
    ids=["series", "roulette"],
)
@pytest.mark.parametrize("jacobian", ["explicit", "autograd"])
def test_neumann_gradient_equals_the_exact_gradient(efficient, jacobian: str) -> None:
    """Lip(g) <= 0.49: 61 terms are exact to float64, and so is the Neumann gradient on either
    Jacobian path, for the input and every parameter, through the solve."""
    exact = make_block("exact", dim=3, coeff=0.7, jacobian="autograd")
    neumann = copy.deepcopy(exact)
    neumann.logdet, neumann.jacobian = efficient, jacobian
    assert neumann.jacobian_path == jacobian
    x = torch.randn(4, 3, dtype=DTYPE)
    results = []
    for block in (exact, neumann):
        x_in = x.clone().requires_grad_()
        y, logdet = block(x_in)
        (logdet.mean() + 0.1 * y.pow(2).sum()).backward()
        results.append((logdet.detach(), x_in.grad, [p.grad for p in block.parameters()]))
    (value_a, grad_x_a, grads_a), (value_b, grad_x_b, grads_b) = results
    torch.testing.assert_close(value_b, value_a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_x_b, grad_x_a, rtol=1e-8, atol=1e-9)
    assert len(grads_a) == len(grads_b) == 5  # two layers' weights and biases, LipSwish's beta
    for a, b in zip(grads_a, grads_b):
        assert a is not None and b is not None and a.abs().max() > 1e-6
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-9)


# 5. The Lipschitz constant ---------------------------------------------------------------------


@pytest.mark.parametrize("coeff", [0.6, 0.95])
def test_singular_values_lie_within_the_cayley_bounds(coeff: float) -> None:
    block = make_block("exact", dim=4, coeff=coeff)
    lip = iresnet.lipschitz_bound(block.g, (4,))
    assert lip < 1
    x = 3 * torch.randn(8, 4, dtype=DTYPE)
    singular = torch.linalg.svdvals(block_jacobians(block, x))
    assert singular.min() >= (1 - lip) / (1 + lip) - 1e-10
    assert singular.max() <= (1 + lip) / (1 - lip) + 1e-10


@pytest.mark.parametrize("a", [0.5, 0.8, 0.95])
def test_monotone_block_exceeds_the_residual_cap(a: float) -> None:
    """g = -a I (certified Lip(g) = a): the monotone block stretches by (1 + a)/(1 - a), the
    Cayley bound itself, beyond 1 + a, the most any residual block x + g(x) reaches."""
    linear = nn.Linear(3, 3)
    with torch.no_grad():
        linear.weight.copy_(-5 * torch.eye(3))
    g = nn.Sequential(iresnet.spectral_norm(linear, a)).to(DTYPE)
    block = iresnet.MonotoneBlock(g, "exact", max_iter=2000)
    block(torch.zeros(1, 3, dtype=DTYPE))
    block.eval()
    iresnet.converge_spectral_norms(block)
    lip = iresnet.lipschitz_bound(g, (3,))
    assert lip == pytest.approx(a, rel=1e-4)  # eval mode's margin: a / (1 + 1e-5)
    x = torch.randn(2, 3, dtype=DTYPE)
    stretch = torch.linalg.matrix_norm(block_jacobians(block, x), 2)
    torch.testing.assert_close(stretch, torch.full((2,), (1 + lip) / (1 - lip), dtype=DTYPE))
    assert (stretch > 1 + lip + 0.1).all()


# 6. Properties ---------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    dim=st.integers(1, 4),
    hidden=st.integers(1, 16),
    coeff=st.floats(0.3, 0.9),
    batch=st.integers(1, 4),
    method=st.sampled_from(["fixed_point", "anderson"]),
)
def test_property_round_trip_and_exact_logdet(seed, dim, hidden, coeff, batch, method) -> None:
    torch.manual_seed(seed)
    block = make_block("exact", dim=dim, hidden=hidden, coeff=coeff, inverse_method=method, max_iter=500)
    x = 2 * torch.randn(batch, dim, dtype=DTYPE)
    with torch.no_grad():
        y, logdet = block(x)
        x_back = block.inverse(y)
    torch.testing.assert_close(x_back, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(logdet, jacobian_logdet(block, x), rtol=1e-8, atol=1e-8)


# 7. Training mode --------------------------------------------------------------------------------


def test_training_mode_inverse_and_logdet_belong_to_the_forward_just_run() -> None:
    """Spectral norms not converged, power iteration running: each training forward pass takes a
    step in every layer and moves the weights (the check has teeth), yet the inverse (which
    freezes the power iteration) inverts the function that pass applied, and its log-det is that
    function's."""
    g = binding(dense_branch(3, 16, 0.9))
    with torch.no_grad():  # as an optimiser step: the singular vectors go stale
        for p in g.parameters():
            p.add_(0.5 * torch.randn_like(p))
    block = iresnet.MonotoneBlock(g.to(DTYPE), "exact").train()
    x = 2 * torch.randn(5, 3, dtype=DTYPE)
    first, _ = block(x)
    before = [p.u.clone() for _, p in spectral_norms(block)]
    y, logdet = block(x)
    after = [p.u for _, p in spectral_norms(block)]
    assert len(after) == 2
    assert all((a - b).abs().max() > 1e-9 for a, b in zip(after, before))  # one step in every layer
    assert (first - y).abs().max() > 1e-6  # the power iteration moved the function
    with torch.no_grad():
        torch.testing.assert_close(block.inverse(y), x, rtol=1e-8, atol=1e-8)
    with frozen_power_iteration(block):
        reference = jacobian_logdet(block, x)
        torch.testing.assert_close(block(x)[0], y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, reference, rtol=1e-8, atol=1e-8)


# 8. Optimisation through the solves ------------------------------------------------------------


def test_adam_decreases_a_toy_likelihood() -> None:
    """30 Adam steps on the Gaussian NLL of stretched data through the Exact log-det."""
    block = iresnet.MonotoneBlock(dense_branch(2, 16, 0.9).to(DTYPE), "exact", max_iter=500).train()
    data = torch.randn(64, 2, dtype=DTYPE) * torch.tensor([4.0, 0.25], dtype=DTYPE)
    optimiser = torch.optim.Adam(block.parameters(), lr=0.02)

    def nll() -> torch.Tensor:
        y, logdet = block(data)
        return (0.5 * y.pow(2).sum(1) - logdet).mean()

    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        loss = nll()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.2, losses
