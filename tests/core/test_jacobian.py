"""Explicit Jacobian products (iresnet.core.jacobian) in float64: J v and J^T u of every layer type and
whole branches against torch.func, the explicit log-det path against the autograd path (values
and gradients), the Neumann surrogate's hand-written backward, the fallback to autograd, and the
Roulette estimator on the explicit path (unbiasedness, Poisson survival)."""

from __future__ import annotations

import copy
import functools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import iresnet
from helpers import binding, conv_branch, dense_branch, jacobian_logdet
from iresnet.models import branches

# the builders' pre-activation branches; the helpers take every setting (the builders' options hold the defaults)
_PRE = {"activation": "lipswish", "power_iterations": 1}
mlp_pre = functools.partial(branches.mlp_branch, depth=3, **_PRE)
conv_pre = functools.partial(branches.conv_branch, **_PRE)
flat_pre = functools.partial(branches.flat_branch, **_PRE)

DTYPE = torch.float64
TIGHT = dict(rtol=1e-12, atol=1e-12)
PATHS = dict(rtol=1e-10, atol=1e-10)


def prepared(g: nn.Module, x: torch.Tensor) -> nn.Module:
    """``g`` in float64 on x's device, run once (convolutions learn their input size), its
    spectral norms converged and frozen (eval mode), so that every call is the same function."""
    g = g.to(device=x.device, dtype=DTYPE)
    with torch.no_grad():
        g(x)
    iresnet.converge_spectral_norms(g)
    return g.eval()


def assert_products_match(g: nn.Module, x: torch.Tensor, nontrivial: bool = True) -> None:
    """``linearize(g, x)``: ``output`` is ``g(x)``, ``jvp`` and ``vjp`` equal torch.func's."""
    products = iresnet.linearize(g, x)
    torch.testing.assert_close(products.output, g(x), rtol=0, atol=0)
    v = torch.randn_like(x)
    u = torch.randn_like(products.output)
    _, jv = torch.func.jvp(g, (x,), (v,))
    _, pullback = torch.func.vjp(g, x)
    (jtu,) = pullback(u)
    torch.testing.assert_close(products.jvp(v), jv, **TIGHT)
    torch.testing.assert_close(products.vjp(u), jtu, **TIGHT)
    if nontrivial:  # not two zeros agreeing
        assert jv.abs().max() > 1e-3 and jtu.abs().max() > 1e-3


def sn(layer: nn.Module, coeff: float = 0.9) -> nn.Module:
    return iresnet.spectral_norm(layer, coeff)


# 1. J v, J^T u and g(x) per layer and per branch --------------------------------------------

LAYERS = [
    pytest.param(lambda: sn(nn.Linear(4, 5)), (4,), id="linear"),
    pytest.param(lambda: nn.Linear(4, 3), (2, 4), id="linear-on-last-dim"),
    pytest.param(lambda: sn(nn.Conv2d(2, 3, 3, padding=1)), (2, 5, 5), id="conv3x3"),
    pytest.param(lambda: sn(nn.Conv2d(3, 2, 1)), (3, 4, 5), id="conv1x1"),
    pytest.param(lambda: sn(nn.Conv2d(2, 3, 3, stride=2)), (2, 8, 8), id="conv-stride2-output-padding"),
    pytest.param(lambda: sn(nn.Conv2d(2, 3, 3, stride=2)), (2, 7, 9), id="conv-stride2-odd"),
    pytest.param(lambda: nn.Conv2d(2, 2, 3, dilation=2), (2, 7, 6), id="conv-dilation2"),
    pytest.param(lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2), (2, 9, 10), id="conv-stride-dilation"),
    pytest.param(lambda: nn.Conv2d(1, 2, (3, 1), stride=(3, 1), padding=(0, 1)), (1, 8, 4), id="conv-anisotropic"),
    pytest.param(lambda: iresnet.LipSwish(beta=1.7), (6,), id="lipswish-beta1.7"),
    pytest.param(lambda: nn.ELU(alpha=0.6), (2, 3, 3), id="elu-alpha0.6"),
    pytest.param(lambda: nn.ELU(alpha=1.5), (6,), id="elu-alpha1.5"),
    pytest.param(lambda: nn.ReLU(), (6,), id="relu"),
    pytest.param(lambda: nn.Sequential(nn.Flatten(), nn.Unflatten(1, (3, 4))), (2, 6), id="flatten-unflatten"),
    pytest.param(
        lambda: nn.Sequential(
            nn.Sequential(sn(nn.Linear(3, 6)), iresnet.LipSwish(beta=2.0)),
            nn.Identity(),
            nn.Sequential(nn.Sequential(nn.ELU(alpha=0.5), sn(nn.Linear(6, 3)))),
        ),
        (3,),
        id="nested-sequential",
    ),
]


@pytest.mark.parametrize("make, shape", LAYERS)
def test_layer_products_match_torch_func(device, make, shape):
    """Each layer type's linearisation: its output and exact J v, J^T u (convolutions with
    stride, dilation, no padding and sizes whose transposed convolution needs output padding)."""
    x = torch.randn(3, *shape, dtype=DTYPE, device=device)
    g = prepared(nn.Sequential(make()), x)
    assert_products_match(g, x)


def test_identity_has_no_factor(device):
    """``nn.Identity`` passes through: J v = v, J^T u = u, and it keeps no factor."""
    x = torch.randn(3, 4, dtype=DTYPE, device=device)
    products = iresnet.linearize(nn.Sequential(nn.Identity()), x)
    v = torch.randn_like(x)
    assert products.layers == [] and products.output is x
    assert torch.equal(products.jvp(v), v) and torch.equal(products.vjp(v), v)


def _activation(name: str) -> type[nn.Module]:
    return branches.ACTIVATIONS[name]


BRANCHES = [
    pytest.param(lambda a: mlp_pre(4, 8, 0.9, activation=a), (4,), id="mlp-pre"),
    pytest.param(lambda a: conv_pre(2, 4, 0.9, activation=a), (2, 5, 5), id="conv-pre"),
    pytest.param(lambda a: flat_pre((2, 3, 3), 8, 0.9, activation=a), (2, 3, 3), id="flat-pre"),
    pytest.param(lambda a: dense_branch(4, 8, 0.9, depth=3, activation=_activation(a)), (4,), id="dense-post"),
    pytest.param(lambda a: conv_branch(2, 4, 0.9, activation=_activation(a)), (2, 5, 5), id="conv-post"),
]


@pytest.mark.parametrize("activation", ["lipswish", "elu", "relu"])
@pytest.mark.parametrize("make, shape", BRANCHES)
def test_branch_products_match_torch_func(device, make, shape, activation):
    """Whole branches, pre- and post-activation order, with every activation."""
    x = torch.randn(3, *shape, dtype=DTYPE, device=device)
    g = prepared(binding(make(activation)), x)
    assert_products_match(g, x)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    channels=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    extra=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    batch=st.integers(1, 3),
    normalised=st.booleans(),
    activation=st.sampled_from(["lipswish", "elu", "relu"]),
)
def test_conv_products_property(
    device, seed, channels, kernel, stride, padding, dilation, extra, batch, normalised, activation
):
    """Any convolution geometry (stride, padding, dilation, input size, hence any output
    padding of the adjoint) followed by an activation: exact J v and J^T u."""
    torch.manual_seed(seed)
    size = [max(1, d * (k - 1) + 1 - 2 * p) + e for k, p, d, e in zip(kernel, padding, dilation, extra)]
    conv = nn.Conv2d(*channels, kernel, stride=stride, padding=padding, dilation=dilation)
    g = nn.Sequential(sn(conv) if normalised else conv, _activation(activation)())
    x = torch.randn(batch, channels[0], *size, dtype=DTYPE, device=device)
    assert_products_match(prepared(g, x), x, nontrivial=False)  # a tiny ReLU layer may be all off


# 2. The explicit path equals the autograd path ------------------------------------------------

ESTIMATORS = {
    "series": lambda: iresnet.PowerSeries(n_terms=6, n_probes=2),
    "series-efficient": lambda: iresnet.PowerSeries(n_terms=6, n_probes=2, memory_efficient=True),
    "geometric": lambda: iresnet.Roulette(n_exact_terms=2, p=0.4),
    "geometric-efficient": lambda: iresnet.Roulette(n_exact_terms=2, p=0.4, memory_efficient=True),
    "poisson": lambda: iresnet.Roulette(n_exact_terms=1, distribution="poisson", rate=3.0),
    "poisson-efficient": lambda: iresnet.Roulette(
        n_exact_terms=1, distribution="poisson", rate=3.0, memory_efficient=True
    ),
    "exact": iresnet.Exact,
}


def branch_of(kind: str, order: str, activation: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A bound branch (its normalisation binds at 0.95): pre-activation from iresnet.models,
    post-activation from the test helpers."""
    if order == "pre":
        if kind == "dense":
            return mlp_pre(3, 8, 0.95, activation=activation), (3,)
        return conv_pre(2, 4, 0.95, activation=activation), (2, 4, 4)
    if kind == "dense":
        return dense_branch(3, 8, 0.95, depth=3, activation=_activation(activation)), (3,)
    return conv_branch(2, 4, 0.95, activation=_activation(activation)), (2, 4, 4)


def twin_blocks(g: nn.Module, x: torch.Tensor, estimator) -> tuple[iresnet.ResidualBlock, ...]:
    """Two blocks on identical copies of ``g``, one per path, in training mode. ``g`` is run
    once first: a convolution's spectral norm draws its power-iteration vectors at its first
    call, so copies made before it would differ."""
    g = g.to(device=x.device, dtype=DTYPE)
    with torch.no_grad():
        g(x)
    blocks = tuple(
        iresnet.ResidualBlock(copy.deepcopy(g), estimator, jacobian=path) for path in ("explicit", "autograd")
    )
    assert [b.jacobian_path for b in blocks] == ["explicit", "autograd"]
    assert "jacobian='explicit'" in repr(blocks[0]) and "jacobian='autograd'" in repr(blocks[1])
    return blocks


def value_and_gradients(block: iresnet.ResidualBlock, x: torch.Tensor, seed: int = 5):
    """The log-det and the gradients of ``logdet.mean() + <r, y>`` for ``x`` and every
    parameter, the random draws fixed by ``seed``; also the log-det's own share of them."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    y, logdet = block(x)
    inputs = [x, *block.parameters()]
    r = torch.linspace(-1, 1, y.numel(), dtype=DTYPE, device=y.device).view_as(y)
    grads = torch.autograd.grad(logdet.mean() + (r * y).sum(), inputs)
    return logdet.detach(), grads


def assert_paths_agree(g: nn.Module, x: torch.Tensor, estimator) -> None:
    explicit, autograd = twin_blocks(g, x, estimator)
    value, grads = value_and_gradients(explicit, x)
    reference, reference_grads = value_and_gradients(autograd, x)
    torch.testing.assert_close(value, reference, **PATHS)
    for a, b in zip(grads, reference_grads):
        torch.testing.assert_close(a, b, **PATHS)
    # the comparison means something: the log-det and its own gradient are sizeable
    assert value.abs().max() > 0.01
    torch.manual_seed(5)
    _, logdet = explicit(x)
    own = torch.autograd.grad(logdet.mean(), list(explicit.parameters()), allow_unused=True)
    assert max(g.abs().max() for g in own if g is not None) > 1e-3


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("activation", ["lipswish", "elu", "relu"])
@pytest.mark.parametrize("order", ["pre", "post"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_explicit_path_equals_autograd_path(device, kind, order, activation, estimator):
    """The core promise: with the same probes and terms the explicit products give the
    autograd path's log-det and its gradients for the input and every parameter (including
    the memory-efficient Neumann gradients)."""
    g, shape = branch_of(kind, order, activation)
    x = 1.5 * torch.randn(3, *shape, dtype=DTYPE, device=device)
    assert_paths_agree(binding(g), x, ESTIMATORS[estimator]())


@pytest.mark.parametrize("estimator", ["series-efficient", "poisson", "exact"])
def test_explicit_path_equals_autograd_path_through_flatten(device, estimator):
    """The flattened MLP branch of the image models, through Flatten and Unflatten."""
    x = 1.5 * torch.randn(2, 2, 2, 2, dtype=DTYPE, device=device)
    g = binding(flat_pre((2, 2, 2), 8, 0.95, activation="elu"))
    assert_paths_agree(g, x, ESTIMATORS[estimator]())


# 3. The Neumann surrogate's backward ---------------------------------------------------------


def strided_branch() -> nn.Sequential:
    """A branch that changes the shape: strided, dilated convolution, 1x1, Flatten, Linear."""
    return nn.Sequential(
        iresnet.LipSwish(beta=1.3),
        sn(nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2)),
        nn.ELU(alpha=0.7),
        sn(nn.Conv2d(3, 2, 1)),
        nn.Flatten(),
        iresnet.LipSwish(),
        sn(nn.Linear(24, 5)),
    )


SURROGATE_BRANCHES = [
    pytest.param(lambda: dense_branch(3, 8, 0.9, depth=3), (3,), id="dense-post-lipswish"),
    pytest.param(lambda: mlp_pre(3, 8, 0.9, activation="elu"), (3,), id="mlp-pre-elu"),
    pytest.param(lambda: conv_branch(2, 4, 0.9, activation=nn.ReLU), (2, 4, 4), id="conv-post-relu"),
    pytest.param(lambda: conv_pre(2, 4, 0.9), (2, 5, 3), id="conv-pre-lipswish"),
    pytest.param(strided_branch, (2, 9, 8), id="strided-flatten"),
]


@pytest.mark.parametrize("make, shape", SURROGATE_BRANCHES)
def test_surrogate_gradient_is_the_gradient_of_w_jv(device, make, shape):
    """``surrogate_gradient(w, v)`` is zero, and under any per-sample upstream weights its
    gradient for x and every parameter is that of <w, J v> per sample."""
    x = torch.randn(4, *shape, dtype=DTYPE, device=device)
    g = prepared(binding(make()), x)
    x.requires_grad_()
    inputs = [x, *g.parameters()]
    products = iresnet.linearize(g, x)
    v, w = torch.randn_like(x), torch.randn_like(products.output)
    upstream = torch.randn(4, dtype=DTYPE, device=device)
    surrogate = products.surrogate_gradient(w, v)
    assert torch.equal(surrogate, torch.zeros(4, dtype=DTYPE, device=device))
    grads = torch.autograd.grad(surrogate, inputs, upstream, allow_unused=True)
    reference = (w * iresnet.linearize(g, x).jvp(v)).flatten(1).sum(1)
    reference_grads = torch.autograd.grad(reference, inputs, upstream, allow_unused=True)
    for a, b in zip(grads, reference_grads):
        if b is None or not b.any():  # e.g. x's gradient through ReLU's piecewise constant slope
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, **TIGHT)
    assert max(b.abs().max() for b in reference_grads if b is not None) > 1e-2


@pytest.mark.parametrize(
    "estimator",
    [
        iresnet.PowerSeries(n_terms=4, probe="basis", memory_efficient=True),
        iresnet.Roulette(n_exact_terms=1, probe="basis", memory_efficient=True),
    ],
    ids=["series", "roulette"],
)
def test_gradcheck_explicit_memory_efficient(device, estimator):
    """With exact traces (basis probes) and a fixed draw, the Neumann gradient of the explicit
    path is the gradient of the estimate itself: gradcheck for x and every parameter."""
    x = torch.randn(2, 2, dtype=DTYPE, device=device)
    g = prepared(binding(dense_branch(2, 4, 0.9)), x)
    block = iresnet.ResidualBlock(g, estimator, jacobian="explicit").eval()
    names = [name for name, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())

    def logdet_of(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)
        return torch.func.functional_call(block, dict(zip(names, values)), (x,))[1]

    assert torch.autograd.gradcheck(logdet_of, (x.clone().requires_grad_(), *params), atol=1e-6)


# 4. Fallback to autograd, registration and errors --------------------------------------------


class Halved(nn.Sequential):
    """A Sequential with its own forward: the explicit products would skip the halving."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(x)


def tanh_branch() -> nn.Module:
    return nn.Sequential(sn(nn.Linear(3, 8)), nn.Tanh(), sn(nn.Linear(8, 3)))


def halved_branch() -> nn.Module:
    return nn.Sequential(sn(nn.Linear(3, 8)), Halved(nn.ELU(), sn(nn.Linear(8, 3))))


def hooked_branch() -> nn.Module:
    last = sn(nn.Linear(8, 3))
    last.register_forward_hook(lambda module, args, out: 0.5 * out)
    return nn.Sequential(sn(nn.Linear(3, 8)), iresnet.LipSwish(), last)


def brute_force_logdet(g: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return jacobian_logdet(lambda z: (z + g(z),), x)


@pytest.mark.parametrize(
    "make, culprit",
    [(tanh_branch, "Tanh has no"), (halved_branch, "Halved has no"), (hooked_branch, "Linear has forward hooks")],
    ids=["tanh", "sequential-subclass", "forward-hook"],
)
def test_unknown_modules_fall_back_to_autograd(device, make, culprit):
    """A module without a rule (or whose forward the rules would skip) sends 'auto' to the
    autograd path, which still gives the exact log-det; 'explicit' refuses, naming it."""
    x = 2 * torch.randn(3, 3, dtype=DTYPE, device=device)
    g = prepared(binding(make()), x)
    block = iresnet.ResidualBlock(g, "exact")
    assert block.jacobian_path == "autograd" and "jacobian='autograd'" in repr(block)
    with pytest.raises(ValueError, match=culprit):
        iresnet.ResidualBlock(g, "exact", jacobian="explicit")
    with pytest.raises(TypeError, match=culprit):
        iresnet.linearize(g, x)
    _, logdet = block(x)
    expected = brute_force_logdet(g, x)
    torch.testing.assert_close(logdet, expected, rtol=1e-10, atol=1e-12)
    assert expected.abs().max() > 0.01


def test_hook_on_a_container_falls_back_to_autograd(device):
    """A forward hook on a (nested) Sequential changes g: the explicit products would skip it."""
    inner = nn.Sequential(sn(nn.Linear(3, 8)), nn.ELU(), sn(nn.Linear(8, 3)))
    inner.register_forward_hook(lambda module, args, out: 0.5 * out)
    x = torch.randn(3, 3, dtype=DTYPE, device=device)
    g = prepared(nn.Sequential(inner), x)
    assert iresnet.ResidualBlock(g, "exact").jacobian_path == "autograd"


def test_string_padding_falls_back_to_autograd(device):
    """``nn.Conv2d(padding='same')`` (no spectral norm) has no explicit rule: 'auto' falls back."""
    x = torch.randn(2, 2, 5, 5, dtype=DTYPE, device=device)
    g = nn.Sequential(nn.Conv2d(2, 2, 3, padding="same")).to(device=device, dtype=DTYPE)
    with torch.no_grad():
        g[0].weight.mul_(0.3)
    _, logdet = iresnet.ResidualBlock(g, "exact")(x)
    torch.testing.assert_close(logdet, brute_force_logdet(g, x), rtol=1e-10, atol=1e-12)


class ScaledTanh(nn.Module):
    """``tanh(s z) / s`` with a learnable ``s = exp(log_scale)``: elementwise, 1-Lipschitz."""

    def __init__(self, scale: float = 1.5) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        s = self.log_scale.exp()
        return torch.tanh(s * z) / s


class ScaledTanhJacobian:
    """``diag(1 - tanh(s a)^2)``, written against the LayerJacobian protocol alone."""

    def __init__(self, a: torch.Tensor, log_scale: torch.Tensor) -> None:
        self.a, self.log_scale = a, log_scale

    @staticmethod
    def slope(a: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
        return 1 - torch.tanh(log_scale.exp() * a).pow(2)

    def jvp(self, t: torch.Tensor) -> torch.Tensor:
        return self.slope(self.a, self.log_scale) * t

    vjp = jvp

    def graph_tensors(self) -> list[torch.Tensor]:
        return [self.a, self.log_scale]

    def rebuilt(self, tensors) -> ScaledTanhJacobian:
        return ScaledTanhJacobian(next(tensors), next(tensors))

    def factor_gradients(self, r: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        with torch.enable_grad():
            a, log_scale = (u.detach().requires_grad_() for u in self.graph_tensors())
            return list(torch.autograd.grad(self.slope(a, log_scale), (a, log_scale), r * t))


def scaled_tanh_rule(module: ScaledTanh, h: torch.Tensor) -> tuple[torch.Tensor, ScaledTanhJacobian]:
    return module(h), ScaledTanhJacobian(h, module.log_scale)


@pytest.mark.parametrize("estimator", ["series", "series-efficient", "poisson-efficient", "exact"])
def test_registered_module_takes_the_explicit_path(device, monkeypatch, estimator):
    """``register_linearization`` teaches a new module type: the explicit path then matches
    the autograd path, values and gradients (the parameter of the new module's too)."""
    monkeypatch.setattr(iresnet.core.jacobian, "_RULES", dict(iresnet.core.jacobian._RULES))  # undone after the test
    g = nn.Sequential(ScaledTanh(), sn(nn.Linear(3, 8), 0.95), ScaledTanh(0.7), sn(nn.Linear(8, 3), 0.95))
    g = binding(g)
    assert iresnet.ResidualBlock(g, "exact").jacobian_path == "autograd"
    iresnet.register_linearization(ScaledTanh, scaled_tanh_rule)
    x = 1.5 * torch.randn(3, 3, dtype=DTYPE, device=device)
    assert_paths_agree(g, x, ESTIMATORS[estimator]())


class ExactByAutograd(iresnet.LogDetEstimator):
    """An estimator with the autograd interface only (no ``from_products``)."""

    def __call__(self, g, x, gx, differentiable):
        return iresnet.Exact()(g, x, gx, differentiable)


def test_estimator_without_from_products_falls_back(device):
    x = 2 * torch.randn(3, 3, dtype=DTYPE, device=device)
    g = prepared(binding(dense_branch(3, 8, 0.9)), x)
    block = iresnet.ResidualBlock(g, ExactByAutograd())
    assert block.jacobian_path == "autograd" and "jacobian='autograd'" in repr(block)
    with pytest.raises(ValueError, match="ExactByAutograd has no from_products"):
        iresnet.ResidualBlock(g, ExactByAutograd(), jacobian="explicit")
    torch.testing.assert_close(block(x)[1], brute_force_logdet(g, x), rtol=1e-10, atol=1e-12)


def test_invalid_jacobian_option():
    with pytest.raises(ValueError, match="jacobian must be"):
        iresnet.ResidualBlock(nn.Identity(), "exact", jacobian="forward")
    block = iresnet.ResidualBlock(nn.Linear(2, 2), "exact", jacobian="autograd")
    assert block.jacobian_path == "autograd"  # chosen, although the explicit path is possible


# 5. Unbiasedness on the explicit path --------------------------------------------------------


@pytest.mark.parametrize(
    "estimator",
    [
        iresnet.Roulette(n_exact_terms=0, p=0.5),
        iresnet.Roulette(n_exact_terms=0, distribution="poisson", rate=1.5, memory_efficient=True),
    ],
    ids=["geometric", "poisson-efficient"],
)
def test_explicit_roulette_is_unbiased(device, estimator):
    """The explicit path's Roulette estimate averages to the exact log-det (within 4 standard
    errors), for both tails. Every term comes from the random tail (no exact terms), so a wrong
    survival weight biases the mean by many standard errors."""
    x = 2 * torch.randn(2, 2, dtype=DTYPE, device=device)
    g = prepared(binding(dense_branch(2, 8, 0.97)), x)
    block = iresnet.ResidualBlock(g, estimator, jacobian="explicit")
    exact = brute_force_logdet(g, x)
    with torch.no_grad():
        draws = torch.stack([block(x)[1] for _ in range(3000)])
    stderr = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - exact).abs() <= 4 * stderr).all()
    assert (stderr < 0.05 * exact.abs()).all() and (exact.abs() > 0.05).all()  # the check has teeth


# 6. Survival probabilities of the tail -------------------------------------------------------


def poisson_upper_tail(rate: float, m: int) -> float:
    """P(N >= m) for N ~ Poisson(rate), as e^-rate times the sum of the upper tail's terms, each
    exact (a Fraction) before rounding; no cancellation."""
    terms = (Fraction(rate) ** j / math.factorial(j) for j in range(m, m + 200))
    return math.exp(-rate) * math.fsum(float(t) for t in terms)


@pytest.mark.parametrize("rate", [0.5, 2.0, 4.5])
def test_poisson_survival_keeps_its_relative_precision(rate):
    """``survival(m)`` equals P(N >= m) to relative 1e-10 for m = 1..40, also where 1 - P(N < m)
    cancels to nothing."""
    roulette = iresnet.Roulette(distribution="poisson", rate=rate)
    for m in range(1, 41):
        assert roulette.survival(m) == pytest.approx(poisson_upper_tail(rate, m), rel=1e-10, abs=0), m
    lower = math.exp(-rate) * math.fsum(rate**j / math.factorial(j) for j in range(30))
    assert abs((1 - lower) / poisson_upper_tail(rate, 30) - 1) > 1e-3  # the naive formula fails there


def test_geometric_survival():
    roulette = iresnet.Roulette(p=0.3)
    for m in range(1, 41):
        assert roulette.survival(m) == pytest.approx(float(Fraction(7, 10) ** (m - 1)), rel=1e-12, abs=0), m


def test_hooks_added_after_construction_turn_auto_to_autograd(device):
    """The path is decided at each call: a hook registered after the block was built (a profiler,
    a FLOP counter) makes "auto" use autograd, with the right log-det, instead of raising."""
    torch.manual_seed(0)
    g = nn.Sequential(sn(nn.Linear(3, 8)), nn.ELU(), sn(nn.Linear(8, 3))).to(device, DTYPE)
    block = iresnet.ResidualBlock(g, "exact").eval()  # no power-iteration step between the two log-dets
    x = torch.randn(4, 3, dtype=DTYPE, device=device)
    assert block.jacobian_path == "explicit"
    handle = g[0].register_forward_hook(lambda module, args, out: 0.5 * out)
    try:
        assert block.jacobian_path == "autograd"
        torch.testing.assert_close(block(x)[1], brute_force_logdet(g, x), rtol=1e-10, atol=1e-12)
    finally:
        handle.remove()
    assert block.jacobian_path == "explicit"
