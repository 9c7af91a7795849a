"""Log-determinant estimators in float64 against brute-force Jacobians."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import iresnet
from helpers import binding, conv_branch, dense_branch, jacobian_logdet
from iresnet.core.memory import SavedTensorMeter


def make_block(device, estimator, dim=3, coeff=0.9, conv=False, jacobian="auto") -> iresnet.ResidualBlock:
    g = conv_branch(dim, 8, coeff, nn.ELU) if conv else dense_branch(dim, 16, coeff)
    block = iresnet.ResidualBlock(binding(g).double().to(device), estimator, jacobian=jacobian)
    shape = (dim, 4, 4) if conv else (dim,)
    block(torch.randn(2, *shape, dtype=torch.float64, device=device))  # conv layers learn the input size
    block.eval()
    iresnet.converge_spectral_norms(block)
    return block


def brute_force_logdet(g: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """log|det(I + J_g)| per sample, by autograd one sample at a time."""
    return jacobian_logdet(lambda z: (z + g(z),), x)


def jacobian_matrices(g: nn.Module, x: torch.Tensor) -> torch.Tensor:
    d = x[0].numel()
    return torch.stack([torch.autograd.functional.jacobian(lambda z: g(z[None])[0], s).reshape(d, d) for s in x])


@pytest.mark.parametrize("conv", [False, True])
def test_exact_matches_brute_force(device, conv):
    block = make_block(device, "exact", conv=conv, dim=2 if conv else 5)
    x = torch.randn(6, *block.event_shape, dtype=torch.float64, device=device) * 2
    _, logdet = block(x)
    assert logdet.shape == (6,)
    torch.testing.assert_close(logdet, brute_force_logdet(block.g, x), rtol=1e-10, atol=1e-12)


def test_logdet_is_not_trivially_zero(device):
    """Guard against tests that pass because the log-det is tiny: it must be sizeable here."""
    block = make_block(device, "exact", dim=4, coeff=0.95)
    x = torch.randn(16, 4, dtype=torch.float64, device=device)
    assert block(x)[1].abs().mean() > 0.01  # far above the 1e-10 tolerances used here


def test_basis_probes_give_the_exact_truncated_series(device):
    """With every basis vector as probe the series estimator is deterministic: it equals
    sum_{k<=n} (-1)^(k+1) tr(J^k) / k from the explicit Jacobian, and its truncation error
    is within d * sum_{k>n} L^k / k for the certified L."""
    n_terms = 4
    block = make_block(device, iresnet.PowerSeries(n_terms=n_terms, probe="basis"), dim=4, coeff=0.95)
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    _, estimate = block(x)
    jac = jacobian_matrices(block.g, x)
    power, truncated = torch.eye(4, dtype=x.dtype, device=device).expand_as(jac), 0
    for k in range(1, n_terms + 1):
        power = power @ jac
        truncated = truncated + (-1) ** (k + 1) * power.diagonal(dim1=1, dim2=2).sum(1) / k
    torch.testing.assert_close(estimate, truncated, rtol=1e-12, atol=1e-12)
    lip = iresnet.lipschitz_bound(block.g, (4,))
    bias_bound = 4 * sum(lip**k / k for k in range(n_terms + 1, 2000))
    exact = brute_force_logdet(block.g, x)
    assert (estimate - exact).abs().max() <= bias_bound
    tail = torch.zeros_like(estimate)  # the bias is the series' tail, to float64 precision
    for k in range(n_terms + 1, 400):
        power = power @ jac
        tail = tail + (-1) ** (k + 1) * power.diagonal(dim1=1, dim2=2).sum(1) / k
    torch.testing.assert_close(exact - estimate, tail, rtol=0, atol=1e-10)
    assert tail.abs().min() > 1e-6  # every sample biased, far above the 1e-10 tolerance


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_series_is_unbiased_for_the_truncated_series(device, probe):
    block = make_block(device, iresnet.PowerSeries(n_terms=3, probe=probe), dim=3)
    x = torch.randn(2, 3, dtype=torch.float64, device=device)
    reference = iresnet.PowerSeries(n_terms=3, probe="basis")
    with torch.no_grad():
        draws = torch.stack([block(x)[1] for _ in range(3000)])
        block.logdet = reference
        target = block(x)[1]
    stderr = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - target).abs() <= 4 * stderr).all()


@pytest.mark.parametrize(
    "estimator",
    [
        iresnet.Roulette(n_exact_terms=2, p=0.5),
        iresnet.Roulette(n_exact_terms=1, distribution="poisson", rate=2.0),
        iresnet.Roulette(n_exact_terms=0, p=0.4, probe="rademacher"),
    ],
    ids=["geometric", "poisson", "no-exact-terms"],
)
def test_roulette_is_unbiased(device, estimator):
    """The mean over many draws is within 4 standard errors of the exact log-det, although
    Lip(g) is high enough that truncating to the expected number of terms is visibly biased."""
    block = make_block(device, estimator, dim=3, coeff=0.97)
    x = torch.randn(3, 3, dtype=torch.float64, device=device) * 2
    exact = brute_force_logdet(block.g, x)
    with torch.no_grad():
        draws = torch.stack([block(x)[1] for _ in range(4000)])
    stderr = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - exact).abs() <= 4 * stderr).all()
    assert (stderr < 0.05 * exact.abs().clamp_min(0.01)).all()  # the check has teeth


def test_roulette_survival_probabilities(device):
    geometric = iresnet.Roulette(p=0.3)
    draws = torch.tensor([geometric.draw_tail_length() for _ in range(20000)], dtype=torch.float64)
    for m in (1, 2, 4):
        assert (draws >= m).double().mean().item() == pytest.approx(geometric.survival(m), abs=0.015)
    poisson = iresnet.Roulette(distribution="poisson", rate=1.5)
    draws = torch.tensor([poisson.draw_tail_length() for _ in range(20000)], dtype=torch.float64)
    for m in (1, 2, 4):
        assert (draws >= m).double().mean().item() == pytest.approx(poisson.survival(m), abs=0.015)


def _seeded(block: iresnet.ResidualBlock, seed: int = 1):
    def logdet_of(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(seed)
        return block(x)[1]

    return logdet_of


@pytest.mark.parametrize(
    "estimator",
    ["exact", iresnet.PowerSeries(n_terms=3), iresnet.Roulette(n_exact_terms=2)],
    ids=["exact", "series", "roulette"],
)
@pytest.mark.parametrize("conv", [False, True])
def test_gradcheck_with_respect_to_input(device, estimator, conv):
    block = make_block(device, estimator, dim=2, conv=conv)
    x = torch.randn(2, *block.event_shape, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(_seeded(block), (x,), atol=1e-6)


@pytest.mark.parametrize(
    "estimator",
    ["exact", iresnet.PowerSeries(n_terms=3), iresnet.Roulette(n_exact_terms=2)],
    ids=["exact", "series", "roulette"],
)
def test_gradcheck_with_respect_to_parameters(device, estimator):
    block = make_block(device, estimator, dim=2)
    x = torch.randn(3, 2, dtype=torch.float64, device=device)
    names = [name for name, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())

    def logdet_of(*values: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)
        return torch.func.functional_call(block, dict(zip(names, values)), (x,))[1]

    assert torch.autograd.gradcheck(logdet_of, params, atol=1e-6)


@pytest.mark.parametrize(
    "plain, efficient",
    [
        (
            iresnet.PowerSeries(n_terms=5, probe="basis"),
            iresnet.PowerSeries(n_terms=5, probe="basis", memory_efficient=True),
        ),
        (
            iresnet.Roulette(n_exact_terms=2, probe="basis"),
            iresnet.Roulette(n_exact_terms=2, probe="basis", memory_efficient=True),
        ),
    ],
    ids=["series", "roulette"],
)
def test_memory_efficient_gradient_equals_plain_gradient(device, plain, efficient):
    """With exact traces the Neumann-series gradient equals the gradient of the estimate, for
    the input and every parameter; the value is the estimate itself, not the surrogate."""
    block = make_block(device, plain, dim=3)
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    results = []
    for estimator in (plain, efficient):
        block.logdet = estimator
        block.zero_grad()
        torch.manual_seed(7)
        x_in = x.clone().requires_grad_()
        y, logdet = block(x_in)
        (logdet.mean() + y.pow(2).sum()).backward()
        results.append((logdet.detach(), x_in.grad, [p.grad.clone() for p in block.parameters()]))
    (value_a, grad_x_a, grads_a), (value_b, grad_x_b, grads_b) = results
    torch.testing.assert_close(value_a, value_b)
    torch.testing.assert_close(grad_x_a, grad_x_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b)


def test_memory_efficient_autograd_path_refuses_per_sample_weights(device):
    """Backward-in-forward sums the parameter gradients over the batch: it cannot weight samples."""
    block = make_block(device, iresnet.Roulette(memory_efficient=True), dim=2, jacobian="autograd")
    block.train()
    _, logdet = block(torch.randn(3, 2, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="same gradient for every"):
        (logdet * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, device=device)).sum().backward()


def test_memory_efficient_explicit_path_weights_samples(device):
    """The explicit path's Neumann surrogate is per sample: a weighted sum of log-dets gets the
    weighted sum of each sample's own gradient (exact traces make each run deterministic)."""
    block = make_block(device, iresnet.PowerSeries(n_terms=4, probe="basis", memory_efficient=True), dim=3)
    x = torch.randn(3, 3, dtype=torch.float64, device=device)
    weights = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, device=device)

    def gradients(rows: torch.Tensor, row_weights: torch.Tensor) -> list[torch.Tensor]:
        block.zero_grad()
        (block(rows)[1] * row_weights).sum().backward()
        return [p.grad.clone() for p in block.parameters() if p.grad is not None]  # the last bias has none

    weighted = gradients(x, weights)
    one_by_one = [gradients(x[i : i + 1], weights[i : i + 1]) for i in range(3)]
    for together, *single in zip(weighted, *one_by_one):
        torch.testing.assert_close(together, sum(single), rtol=1e-10, atol=1e-12)
    assert max(g.abs().max() for g in weighted) > 1e-3


def _graph_bytes(device, estimator) -> tuple[int, int]:
    torch.manual_seed(0)
    g = dense_branch(8, 64, 0.9).to(device)
    block = iresnet.ResidualBlock(g, estimator)
    x = torch.randn(256, 8, device=device)
    with SavedTensorMeter() as meter:
        y, logdet = block(x)
        held = meter.current
        (y.pow(2).sum() + logdet.mean()).backward()
    return held, meter.peak


def test_memory_efficient_memory_does_not_grow_with_terms(device):
    efficient = [_graph_bytes(device, iresnet.PowerSeries(n_terms=n, memory_efficient=True)) for n in (2, 8, 32)]
    plain = [_graph_bytes(device, iresnet.PowerSeries(n_terms=n)) for n in (2, 8, 32)]
    assert efficient[0] == efficient[1] == efficient[2]
    assert plain[2][1] > 4 * plain[0][1]  # the plain graph grows with the number of terms
    assert efficient[2][1] < plain[0][1]


def test_value_without_grad_equals_value_with_grad(device):
    block = make_block(device, iresnet.Roulette(memory_efficient=True), dim=3)
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    torch.manual_seed(3)
    with torch.no_grad():
        no_grad = block(x)[1]
    torch.manual_seed(3)
    with_grad = block(x)[1]
    torch.testing.assert_close(no_grad, with_grad.detach())
    assert not no_grad.requires_grad


def test_bad_estimator_options():
    with pytest.raises(ValueError, match="logdet must be one of"):
        iresnet.ResidualBlock(nn.Identity(), "hutchinson")
    with pytest.raises(ValueError, match="probe"):
        iresnet.PowerSeries(probe="uniform")
    with pytest.raises(ValueError, match="p must lie"):
        iresnet.Roulette(p=1.0)


def test_make_estimator_from_a_mapping() -> None:
    """Configuration files name an estimator and its options as a mapping."""
    from iresnet.core.logdet import make_estimator

    series = make_estimator({"name": "series", "n_terms": 10, "probe": "rademacher"})
    assert isinstance(series, iresnet.PowerSeries) and series.n_terms == 10 and series.probe == "rademacher"
    roulette = make_estimator({"name": "roulette", "distribution": "poisson", "rate": 3.0})
    assert roulette.distribution == "poisson" and roulette.rate == 3.0
    with pytest.raises(ValueError, match="logdet must be one of"):
        make_estimator({"n_terms": 3})
    with pytest.raises(TypeError):
        make_estimator({"name": "series", "terms": 3})


@pytest.mark.parametrize("jacobian", ["explicit", "autograd"])
@pytest.mark.parametrize("logdet", ["exact", "series", "roulette"])
def test_empty_batch_gives_an_empty_logdet(jacobian, logdet, device):
    """The audit: an empty batch through Exact raised IndexError."""
    torch.manual_seed(0)
    block = iresnet.ResidualBlock(dense_branch(2, 8, 0.9).to(device), logdet, jacobian=jacobian)
    x = torch.randn(0, 2, device=device, requires_grad=True)
    y, logdet_value = block(x)
    assert y.shape == (0, 2) and logdet_value.shape == (0,)
    logdet_value.sum().backward()  # differentiable, with nothing to add


@pytest.mark.parametrize("jacobian", ["explicit", "autograd"])
def test_poisson_roulette_without_exact_terms_stays_in_the_graph(jacobian, device):
    """The audit: Roulette(0, "poisson") draws no term with probability exp(-2) and returned zeros
    without a graph, so backward() through a loss of it alone raised."""
    torch.manual_seed(0)
    estimator = iresnet.core.logdet.Roulette(0, "poisson")
    block = iresnet.ResidualBlock(dense_branch(2, 8, 0.9).to(device), estimator, jacobian=jacobian)
    empty_draws = 0
    for _ in range(40):
        x = torch.randn(4, 2, device=device, requires_grad=True)
        _, logdet_value = block(x)
        assert logdet_value.requires_grad
        logdet_value.sum().backward()
        empty_draws += bool((logdet_value == 0).all())
    assert empty_draws > 0  # the case was met (P = exp(-2) per call)


@pytest.mark.parametrize("jacobian", ["explicit", "autograd"])
@pytest.mark.parametrize("estimator", [iresnet.PowerSeries(n_terms=40), iresnet.Roulette(2)])
def test_series_refuses_to_evaluate_a_branch_that_expands(jacobian, estimator, device):
    """The audit: for a g that is not contractive the series gave 9.8 (1.5e11 with 40 terms) and
    the roulette 0.87 against an exact 1.83, with no error."""
    torch.manual_seed(0)
    linear = nn.Linear(3, 3, bias=False).double().to(device)
    with torch.no_grad():
        linear.weight.copy_(1.5 * torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(3, 3, dtype=torch.float64))
    block = iresnet.ResidualBlock(nn.Sequential(linear, nn.Tanh() if jacobian == "autograd" else nn.ELU()), estimator)
    block.jacobian = jacobian
    x = 0.01 * torch.randn(16, 3, dtype=torch.float64, device=device)
    with torch.no_grad(), pytest.raises(ValueError, match="not contractive at 16 of 16 samples"):
        block(x)


def test_series_evaluates_a_contractive_branch_without_complaint(device):
    torch.manual_seed(0)
    block = iresnet.ResidualBlock(dense_branch(3, 16, 0.99).double().to(device), iresnet.PowerSeries(n_terms=40))
    block.eval()
    with torch.no_grad():
        _, value = block(3 * torch.randn(64, 3, dtype=torch.float64, device=device))
    assert torch.isfinite(value).all()
