"""i-DenseNets (Perugachi-Diaz, Tomczak, Bhulai, NeurIPS 2021) in float64: CLipSwish's Lipschitz
constant measured, the dense layers' and dense branches' certificates against exact Jacobian
norms, residual blocks of dense branches (inverse, log-det, gradients), the explicit Jacobian
products against autograd, and the builders' ``block`` option."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import iresnet
from helpers import binding, jacobian_logdet
from iresnet.core.activations import CLIPSWISH_CONSTANT
from iresnet.core.certificates import design_bound
from iresnet.models import branches, image_flow, toy_flow

DTYPE = torch.float64
PATHS = dict(rtol=1e-10, atol=1e-10)


def jacobian_norms(g: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The exact spectral norm of ``g``'s Jacobian at each sample of ``x``."""
    norms = []
    for sample in x:
        jacobian = torch.autograd.functional.jacobian(lambda z: g(z[None])[0], sample)
        norms.append(torch.linalg.matrix_norm(jacobian.reshape(-1, sample.numel()), 2))
    return torch.stack(norms)


def converged(g: nn.Module, x: torch.Tensor) -> nn.Module:
    """``g`` in float64, run once (convolutions learn their input size), spectral norms converged,
    in eval mode: one fixed function."""
    g = g.to(DTYPE)
    with torch.no_grad():
        g(x)
    iresnet.converge_spectral_norms(g)
    return g.eval()


def vector_branch(dim: int = 3, growth: int = 6, layers: int = 2, coeff: float = 0.9, **kwargs) -> nn.Sequential:
    return branches.dense_branch(dim, growth, coeff, layers=layers, power_iterations=1, **kwargs)


def image_branch(channels: int = 2, growth: int = 4, layers: int = 2, coeff: float = 0.9) -> nn.Sequential:
    return branches.dense_conv_branch(channels, growth, coeff, layers=layers, power_iterations=1)


def with_learned_eta(g: nn.Module) -> nn.Module:
    """Move the concatenation weights and the activations' beta off their initial values."""
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, iresnet.DenseLayer):
                m.raw_eta.copy_(torch.randn(2, dtype=m.raw_eta.dtype))
            if isinstance(m, iresnet.CLipSwish):
                m.raw_beta.add_(torch.randn(()).item())
    return g


# 1. CLipSwish ----------------------------------------------------------------------------------


def test_clipswish_constant_is_the_paper_s():
    """L / 1.1 (the constant of LipSwish concatenated) is the paper's 1.004."""
    assert CLIPSWISH_CONSTANT / 1.1 == pytest.approx(1.004, abs=5e-4)


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 1.0, 3.0, 10.0, 100.0])
def test_clipswish_is_one_lipschitz_and_tight(beta):
    """The largest singular value of CLipSwish's Jacobian, over many random inputs, stays at
    most 1 and comes close to 1, for every beta; at the peak u* / beta it is 1 to rounding."""
    act = iresnet.CLipSwish(beta).to(DTYPE)
    x = torch.randn(400, 6, dtype=DTYPE) * 4 / beta
    norms = jacobian_norms(act, x)
    assert norms.max() <= 1 + 1e-12
    assert norms.max() >= 0.999
    u_star = 2.399357280515468  # u tanh(u/2) = 2, where the slope of Swish peaks
    at_peak = jacobian_norms(act, torch.tensor([[u_star / beta, -u_star / beta]], dtype=DTYPE))
    assert at_peak.item() == pytest.approx(1.0, abs=1e-12)


def test_clipswish_random_betas_and_learned_beta():
    """Random betas, the measured maximum of ||J|| over random inputs: at most 1, close to 1."""
    worst = 0.0
    for _ in range(20):
        beta = math.exp(torch.empty(()).uniform_(-3, 3).item())
        act = iresnet.CLipSwish(beta).to(DTYPE)
        x = torch.randn(200, 4, dtype=DTYPE) * 3 / beta
        worst = max(worst, jacobian_norms(act, x).max().item())
    assert 0.999 <= worst <= 1 + 1e-12


def test_clipswish_doubles_the_channels():
    act = iresnet.CLipSwish().to(DTYPE)
    x = torch.randn(2, 3, 4, 4, dtype=DTYPE)
    out = act(x)
    assert out.shape == (2, 6, 4, 4)
    phi = x * torch.sigmoid(act.beta * x)
    mirror = -x * torch.sigmoid(-act.beta * x)
    torch.testing.assert_close(out, torch.cat([phi, mirror], 1) / CLIPSWISH_CONSTANT, rtol=0, atol=1e-15)
    assert iresnet.lipschitz_bound(nn.Sequential(act), (3, 4, 4)) == 1.0


# 2. Dense layers and branches: certificates ---------------------------------------------------


def test_dense_layer_weights_have_the_norm_coeff():
    layer = iresnet.DenseLayer(nn.Linear(3, 2), coeff=0.8).to(DTYPE)
    with torch.no_grad():
        layer.raw_eta.copy_(torch.tensor([-4.0, 3.0]))
    eta = layer.eta
    assert torch.linalg.vector_norm(eta).item() == pytest.approx(0.8, abs=1e-15)
    assert (eta > 0).all()
    with pytest.raises(ValueError, match="coeff must be a number in"):
        iresnet.DenseLayer(nn.Linear(3, 2), coeff=1.5)


def test_dense_layer_bound_is_exact_where_linear():
    """A dense layer with a linear network is the linear map [eta_1 I; eta_2 W], whose norm is
    sqrt(eta_1^2 + eta_2^2 ||W||^2): the certificate equals it."""
    layer = with_learned_eta(iresnet.DenseLayer(nn.Sequential(nn.Linear(3, 5)))).to(DTYPE)
    x = torch.randn(4, 3, dtype=DTYPE)
    exact = jacobian_norms(layer, x)
    torch.testing.assert_close(exact, exact[:1].expand(4))  # the same everywhere: linear
    assert iresnet.lipschitz_bound(layer, (3,)) == pytest.approx(exact[0].item(), rel=1e-12)


@pytest.mark.parametrize("activation", ["clipswish", "lipswish", "elu"])
def test_dense_branch_bound_covers_the_jacobian(activation):
    """lipschitz_bound >= ||J_g(x)|| at random points, and <= the promised coefficient."""
    x = 2 * torch.randn(30, 3, dtype=DTYPE)
    g = converged(with_learned_eta(binding(vector_branch(activation=activation))), x)
    bound = iresnet.lipschitz_bound(g, (3,))
    assert jacobian_norms(g, x).max() <= bound * (1 + 1e-10)
    assert bound <= 0.9 * (1 + 1e-6)
    assert design_bound(g) == pytest.approx(0.9)


def test_dense_conv_branch_bound_covers_the_jacobian():
    x = torch.randn(4, 2, 5, 5, dtype=DTYPE)
    g = converged(with_learned_eta(binding(image_branch())), x)
    bound = iresnet.lipschitz_bound(g, (2, 5, 5))
    assert jacobian_norms(g, x).max() <= bound * (1 + 1e-10)
    assert bound <= 0.9 * (1 + 1e-6)
    assert design_bound(g) == pytest.approx(0.9)


def test_design_bound_refuses_what_the_construction_does_not_promise():
    """An unnormalised network inside a dense layer promises nothing; coefficients of 1 would
    promise 1, which a residual block refuses."""
    assert design_bound(nn.Sequential(iresnet.DenseLayer(nn.Linear(2, 2)), nn.Linear(4, 2))) is None
    with pytest.raises(ValueError, match="allow Lip"):
        iresnet.ResidualBlock(vector_branch(coeff=0.999).append(iresnet.spectral_norm(nn.Linear(3, 3), 1.01)))


# 3. Residual blocks of dense branches ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["vector", "conv"])
def test_dense_block_inverse_logdet_gradcheck(kind):
    shape = (3,) if kind == "vector" else (2, 4, 4)
    x = 1.5 * torch.randn(3, *shape, dtype=DTYPE)
    g = vector_branch() if kind == "vector" else image_branch()
    g = converged(with_learned_eta(binding(g)), x)
    block = iresnet.ResidualBlock(g, "exact")
    assert block.jacobian_path == "explicit"
    y, logdet = block(x)
    torch.testing.assert_close(block.inverse(y), x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(logdet, jacobian_logdet(block, x), rtol=1e-10, atol=1e-10)
    assert logdet.abs().max() > 1e-2  # not two zeros agreeing
    xs = x[:1].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: block(z)[1], (xs,))
    assert torch.autograd.gradcheck(lambda z: block(z)[0], (xs,))


def test_dense_linearization_matches_torch_func():
    """linearize: output, J v and J^T u of a dense branch (a conv one too) equal torch.func's."""
    for g, shape in ((vector_branch(), (3,)), (image_branch(), (2, 4, 4))):
        x = torch.randn(2, *shape, dtype=DTYPE)
        g = converged(with_learned_eta(binding(g)), x)
        products = iresnet.linearize(g, x)
        torch.testing.assert_close(products.output, g(x), rtol=0, atol=0)
        v, u = torch.randn_like(x), torch.randn_like(x)
        _, jv = torch.func.jvp(g, (x,), (v,))
        _, pullback = torch.func.vjp(g, x)
        torch.testing.assert_close(products.jvp(v), jv, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(products.vjp(u), pullback(u)[0], rtol=1e-12, atol=1e-12)


ESTIMATORS = {
    "series": lambda: iresnet.PowerSeries(n_terms=6, n_probes=2),
    "series-efficient": lambda: iresnet.PowerSeries(n_terms=6, n_probes=2, memory_efficient=True),
    "poisson-efficient": lambda: iresnet.Roulette(
        n_exact_terms=1, distribution="poisson", rate=3.0, memory_efficient=True
    ),
    "exact": iresnet.Exact,
}


def value_and_gradients(block: iresnet.ResidualBlock, x: torch.Tensor):
    torch.manual_seed(5)
    x = x.clone().requires_grad_()
    y, logdet = block(x)
    r = torch.linspace(-1, 1, y.numel(), dtype=DTYPE).view_as(y)
    return logdet.detach(), torch.autograd.grad(logdet.mean() + (r * y).sum(), [x, *block.parameters()])


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("kind", ["vector", "conv"])
def test_explicit_path_equals_autograd_path(kind, estimator):
    """With the same draws, the explicit products give the autograd path's log-det and its
    gradients for the input and every parameter (the weights eta and CLipSwish's beta too)."""
    shape = (3,) if kind == "vector" else (2, 4, 4)
    x = 1.5 * torch.randn(3, *shape, dtype=DTYPE)
    g = with_learned_eta(binding(vector_branch() if kind == "vector" else image_branch())).to(DTYPE)
    with torch.no_grad():
        g(x)
    explicit, autograd = (
        iresnet.ResidualBlock(copy.deepcopy(g), ESTIMATORS[estimator](), jacobian=path)
        for path in ("explicit", "autograd")
    )
    assert explicit.jacobian_path == "explicit"
    value, grads = value_and_gradients(explicit, x)
    reference, reference_grads = value_and_gradients(autograd, x)
    torch.testing.assert_close(value, reference, **PATHS)
    for a, b in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, **PATHS)
    assert value.abs().max() > 0.01
    names = [name for name, _ in explicit.named_parameters()]
    assert any(name.endswith("raw_eta") for name in names) and any(name.endswith("raw_beta") for name in names)


def test_dense_layer_with_an_unknown_network_falls_back_to_autograd():
    """The explicit path looks inside a dense layer: a module it does not know there means autograd."""
    g = nn.Sequential(
        iresnet.DenseLayer(nn.Sequential(iresnet.spectral_norm(nn.Linear(2, 3)), nn.Softplus())),
        iresnet.spectral_norm(nn.Linear(5, 2)),
    )
    block = iresnet.ResidualBlock(g, "exact")
    assert block.jacobian_path == "autograd"
    with pytest.raises(ValueError, match="Softplus has no registered linearisation"):
        iresnet.ResidualBlock(g, "exact", jacobian="explicit")


@settings(max_examples=15, deadline=None)
@given(
    dim=st.integers(1, 4),
    growth=st.integers(1, 4).map(lambda n: 2 * n),
    layers=st.integers(0, 3),
    coeff=st.floats(0.3, 0.95),
    seed=st.integers(0, 2**16),
)
@example(dim=1, growth=2, layers=0, coeff=0.875, seed=0)  # a slow contraction: 100 Banach steps fell short of 1e-10
def test_dense_branch_property(dim, growth, layers, coeff, seed):
    """Over widths and depths: the certificate covers the Jacobian and keeps the coefficient, and
    the block inverts itself."""
    torch.manual_seed(seed)
    x = 2 * torch.randn(4, dim, dtype=DTYPE)
    g = converged(with_learned_eta(binding(vector_branch(dim, growth, layers, coeff))), x)
    bound = iresnet.lipschitz_bound(g, (dim,))
    assert jacobian_norms(g, x).max() <= bound * (1 + 1e-10)
    assert bound <= coeff * (1 + 1e-6)
    assert design_bound(g) == pytest.approx(coeff)
    block = iresnet.ResidualBlock(g, "exact", max_iter=1000)  # Banach at rate 0.95 needs ~450 steps to 1e-10
    y, _ = block(x)
    torch.testing.assert_close(block.inverse(y), x, rtol=1e-8, atol=1e-8)


# 4. The builders' option ----------------------------------------------------------------------


def test_block_option_reaches_the_toy_flow():
    model = toy_flow(2, blocks=2, hidden=8, depth=3, block="densenet")
    blocks = [m for m in model.modules() if isinstance(m, iresnet.ResidualBlock)]
    assert len(blocks) == 2
    for block in blocks:
        assert sum(isinstance(m, iresnet.DenseLayer) for m in block.g.modules()) == 2
        assert any(isinstance(m, iresnet.CLipSwish) for m in block.g.modules())
        assert block.jacobian_path == "explicit"
        assert design_bound(block.g) == pytest.approx(0.9)
    assert model(torch.randn(5, 2)).shape == (5,)
    plain = toy_flow(2, blocks=1, hidden=8)
    assert not any(isinstance(m, iresnet.DenseLayer) for m in plain.modules())


def test_block_option_reaches_the_image_flow():
    model = image_flow((1, 8, 8), 17, scales=2, blocks=1, hidden=8, fc_blocks=1, fc_hidden=8, block="densenet")
    blocks = [m for m in model.modules() if isinstance(m, iresnet.ResidualBlock)]
    assert len(blocks) == 3
    assert all(any(isinstance(m, iresnet.DenseLayer) for m in b.g.modules()) for b in blocks)
    assert model(torch.randint(0, 17, (3, 1, 8, 8))).shape == (3,)
    with pytest.raises(ValueError, match="block must be one of 'resflow', 'densenet', 'monotone', 'implicit'"):
        image_flow((1, 8, 8), 17, block="dense")


# 5. The compiled inverse ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vector", "conv"])
def test_dense_branch_as_a_function_of_its_tensors(kind):
    """The compiled inverse's description of a dense branch (its tensors and a static spec)
    evaluates to g itself."""
    from iresnet.core.compiled import _described, _evaluate

    shape = (3,) if kind == "vector" else (2, 4, 4)
    x = torch.randn(3, *shape, dtype=DTYPE)
    g = converged(with_learned_eta(binding(vector_branch() if kind == "vector" else image_branch())), x)
    tensors, spec = _described(g)
    torch.testing.assert_close(_evaluate(x, tensors, spec), g(x), rtol=0, atol=1e-14)


def test_compiled_inverse_of_a_dense_block():
    torch.manual_seed(0)
    x = torch.randn(8, 2, dtype=DTYPE)
    g = converged(with_learned_eta(binding(vector_branch(2, 4, 2))), x)
    block = iresnet.ResidualBlock(g, "exact", compile_inverse=True)
    y, _ = block(x)
    torch.testing.assert_close(block.inverse(y), x, rtol=1e-8, atol=1e-8)


def test_compiled_training_loss_equals_eager_for_the_same_draw():
    """torch.compile of a dense flow on the device-loop roulette (the Neumann gradient, a fixed
    tail length, basis probes): eager's loss and gradients."""
    from test_compile import _fixed_tail

    torch.manual_seed(0)
    roulette = {"name": "roulette", "n_exact_terms": 1, "probe": "basis", "memory_efficient": True}
    model, x = toy_flow(2, blocks=2, hidden=8, block="densenet", logdet=roulette), torch.randn(64, 2)
    iresnet.initialize_from_data(model, x)
    model.eval()
    twin = copy.deepcopy(model)
    _fixed_tail(model, 3), _fixed_tail(twin, 3)
    torch._dynamo.reset()
    losses, grads = [], []
    for m in (model, torch.compile(twin, backend="aot_eager")):
        torch.manual_seed(4)
        loss = -m(x).mean()
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
