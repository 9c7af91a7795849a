r"""The power series of the log-determinant and its truncated estimator, :class:`PowerSeries`.

For :math:`\mathrm{Lip}(g) < 1`,

.. math:: \log\det(I + J_g) = \sum_{k \ge 1} \frac{(-1)^{k+1}}{k} \mathrm{tr}(J_g^k),

whose traces Hutchinson's estimator :math:`\mathrm{tr}(A) = \mathbb{E}[v^\top A v]` reduces to
``k`` vector-Jacobian products each. The Cayley transform of a :class:`~iresnet.MonotoneBlock`
has the odd terms only, twice and negated:

.. math:: \log\det((I - J_g)(I + J_g)^{-1}) = -2 \sum_{k \text{ odd}} \frac{1}{k} \mathrm{tr}(J_g^k),

the same products with other coefficients :math:`a_k` (:func:`term_scale` gives :math:`k a_k`).

With ``memory_efficient=True`` the gradient comes from the Neumann series
:math:`\partial_\theta \log\det(I + J_g) = \sum_{k \ge 0} (-1)^k \mathrm{tr}(J_g^k \, \partial_\theta J_g)`,
estimated with the same probe and terms, and is
computed during the forward pass so the series' graph is released at once: memory no longer
grows with the number of terms. The value returned is always the estimate itself, never the
gradient surrogate.

References:
    Behrmann et al., "Invertible Residual Networks", ICML 2019, https://arxiv.org/abs/1811.00995

    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", 1989
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .estimator import LogDetEstimator, in_graph
from .jacobian import Linearization
from .validation import check_choice, check_count, check_flag

__all__ = ["SeriesEstimator", "PowerSeries", "term_scale"]

PROBES = ("gaussian", "rademacher", "basis")
"""The Hutchinson probes: Gaussian, Rademacher, or every basis vector in turn (exact traces)."""


def _probes(x: Tensor, kind: str) -> Iterator[Tensor]:
    """Probe vectors ``v`` with :math:`E[v v^T] = I`: one Gaussian or Rademacher draw, or
    every basis vector in turn (``"basis"``, exact traces at ``d`` times the cost)."""
    if kind == "gaussian":
        yield torch.randn_like(x)
    elif kind == "rademacher":
        yield torch.randint_like(x, 2).mul_(2).sub_(1)
    else:
        for i in range(x.shape[1:].numel()):
            v = torch.zeros_like(x).flatten(1)
            v[:, i] = 1
            yield v.view_as(x)


def term_scale(k: int, cayley: bool) -> float:
    """:math:`k a_k` for the series' coefficient :math:`a_k` of :math:`\\mathrm{tr}(J^k)`: :math:`(-1)^{k+1}`
    for :math:`\\log\\det(I + J)`, and with ``cayley`` :math:`-2` for odd ``k``, 0 for even ``k``. The
    value's term is ``term_scale * weight / k``; the Neumann gradient's, ``term_scale * weight``.

    >>> [term_scale(k, False) for k in (1, 2, 3)], [term_scale(k, True) for k in (1, 2, 3)]
    ([1.0, -1.0, 1.0], [-2.0, 0.0, -2.0])
    """
    if cayley:
        return -2.0 if k % 2 else 0.0
    return 1.0 if k % 2 else -1.0


def _per_sample_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1)


class _StoredGradient(torch.autograd.Function):
    """Hands back gradients computed during the forward pass (backward-in-forward).

    The parameter gradients were summed over the batch, so they are exact only when every
    sample's log-determinant receives the same upstream gradient, as in a mean loss; anything
    else raises rather than returning a wrong gradient."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: Sequence[Tensor | None], x: Tensor, *params: Tensor):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, upstream: Tensor):
        grad_x, *grad_params = ctx.grads
        ctx.grads = None
        if grad_x is not None:
            grad_x = upstream.view(-1, *[1] * (grad_x.dim() - 1)) * grad_x
        if any(p is not None for p in grad_params):
            if not torch.allclose(upstream, upstream[0].expand_as(upstream)):
                raise RuntimeError(
                    "memory_efficient log-determinants need the same gradient for every "
                    "sample's log-det (a mean or sum of the batch); use memory_efficient=False "
                    "for per-sample weights"
                )
            scale = upstream[0]
            grad_params = [None if p is None else scale * p for p in grad_params]
        return (None, None, grad_x, *grad_params)


class SeriesEstimator(LogDetEstimator):
    """Shared machinery of the power-series estimators: given the number of terms ``n`` and
    weights ``c_k`` (``1 / P(N >= k)`` for a randomised series), estimate
    :math:`\\sum_{k=1}^n (-1)^{k+1} c_k \\, v^\\top J^k v / k` averaged over probes."""

    def __init__(self, n_probes: int, probe: str, memory_efficient: bool) -> None:
        check_count("n_probes", n_probes)
        check_choice("probe", probe, PROBES)
        check_flag("memory_efficient", memory_efficient)
        self.n_probes = n_probes
        self.probe = probe
        self.memory_efficient = memory_efficient

    def term_weights(self) -> list[float]:
        """Draw the number of terms; return the weight of each term ``k = 1..n``."""
        raise NotImplementedError

    def draw(self, like: Tensor, graph_free: bool = False) -> Sequence[Sequence[float] | Sequence[Tensor] | Tensor]:
        """Each probe's term weights (:meth:`term_weights`), or a tail length drawn on
        the device (see :class:`Roulette`); ``graph_free`` says that the series will be computed
        without a graph."""
        return [self.term_weights() for _ in range(self.n_probes)]

    def device_series(
        self, products: Linearization, v: Tensor, neumann: bool, tail_length: Tensor, cayley: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The series and the Neumann vector for a tail length drawn on the device."""
        raise NotImplementedError

    explicit_jacobian = True

    def from_products(
        self, products: Linearization, x: Tensor, differentiable: bool, draws: Any, cayley: bool = False
    ) -> Tensor:
        """The series from explicit products: :math:`u_k = J^\\top u_{k-1}`, :math:`u_0 = v`, gives
        the terms :math:`v^\\top J^k v = \\langle u_k, v \\rangle`. With ``memory_efficient`` the
        terms are computed without a graph and the gradient is that of the Neumann surrogate
        :math:`\\langle w, J v \\rangle`, :math:`w = \\sum_k (-1)^{k+1} c_k u_{k-1}` held fixed and
        :math:`J v` one tangent pass in the graph: the value is the estimate, the gradient the
        Neumann series', and the backward pass is first-order. Without it the terms themselves
        are differentiated (memory grows with the number of terms)."""
        neumann = self.memory_efficient and differentiable
        value = x.new_zeros(x.shape[0])
        surrogate = x.new_zeros(x.shape[0])
        expansion = None if differentiable else _ExpansionWatch(products)
        watched: _VectorJacobian = products if expansion is None else expansion
        for weights in draws:
            for v in _probes(x, self.probe):
                with torch.set_grad_enabled(differentiable and not neumann):
                    if isinstance(weights, Tensor):  # a tail length drawn on the device
                        series, neumann_vector = self.device_series(products, v, neumann, weights, cayley)
                    else:
                        series, neumann_vector = _host_series(watched, v, weights, neumann, cayley)
                    value = value + _per_sample_dot(series, v)
                if neumann:
                    surrogate = surrogate + products.surrogate_gradient(neumann_vector, v)
        value = value / self.n_probes
        if expansion is not None:
            expansion.check()
        if not neumann:
            return in_graph(value, products.output) if differentiable else value.detach()
        return value.detach() + surrogate / self.n_probes

    def __call__(self, g: nn.Module, x: Tensor, gx: Tensor, differentiable: bool, cayley: bool = False) -> Tensor:
        params = [p for p in g.parameters() if p.requires_grad]
        neumann = self.memory_efficient and differentiable and (x.requires_grad or params)
        create_graph = differentiable and not neumann
        outer = x
        made = x if x._base is None else x._base  # of an alias (ResidualBlock's), the tensor it shows
        if neumann and made.grad_fn is not None:  # partial derivatives, x held fixed: _StoredGradient hands
            with torch.enable_grad():  # x's on to whatever made x, whose graph may hold these parameters too
                x = x.detach().requires_grad_()  # (a block's solve); one more evaluation of g, at a leaf
                gx = g(x)
        value = x.new_zeros(x.shape[0])
        surrogate = x.new_zeros(x.shape[0])
        expansion = _ExpansionWatch()
        for _ in range(self.n_probes):
            weights = self.term_weights()
            for v in _probes(x, self.probe):
                vjp = v  # v^T J^{k-1}
                neumann_vector = torch.zeros_like(v)
                for k, weight in enumerate(weights, start=1):
                    sign = term_scale(k, cayley)
                    if neumann:
                        neumann_vector += sign * weight * vjp
                    previous = vjp
                    (vjp,) = torch.autograd.grad(gx, x, vjp, create_graph=create_graph, retain_graph=True)
                    if not differentiable:
                        expansion.observe(previous, vjp)
                    value = value + sign * weight / k * _per_sample_dot(vjp, v)
                if neumann:
                    (jt_w,) = torch.autograd.grad(gx, x, neumann_vector, create_graph=True, retain_graph=True)
                    surrogate = surrogate + _per_sample_dot(jt_w, v)
        value = value / self.n_probes
        if not differentiable:
            expansion.check()
        if not neumann:
            return in_graph(value, gx) if differentiable else value.detach()
        inputs = ([x] if outer.requires_grad else []) + params
        grads = torch.autograd.grad(surrogate.sum() / self.n_probes, inputs, retain_graph=True, allow_unused=True)
        stored: list[Tensor | None] = list(grads) if outer.requires_grad else [None, *grads]
        return _StoredGradient.apply(value.detach(), stored, outer, *params)


class _ExpansionWatch:
    r"""Watches the series' products :math:`u_k = J^\top u_{k-1}` for proof that ``g`` is not
    contractive: :math:`\|u_k\| / \|u_{k-1}\| \le \|J_g(x)\| \le \mathrm{Lip}(g)`, so a ratio
    above 1 shows :math:`\mathrm{Lip}(g) > 1`, where the series diverges or means nothing.
    :meth:`check` raises then. Wraps ``products`` (for :func:`_host_series`) or is fed pairs."""

    def __init__(self, products: Linearization | None = None) -> None:
        self.products = products
        self.largest: Tensor | None = None

    def vjp(self, u: Tensor) -> Tensor:
        if self.products is None:
            raise RuntimeError("this _ExpansionWatch is fed pairs (observe): it wraps no products to apply")
        out = self.products.vjp(u)
        self.observe(u, out)
        return out

    def observe(self, before: Tensor, after: Tensor) -> None:
        ratio = after.flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1).clamp_min(1e-30)
        self.largest = ratio if self.largest is None else torch.maximum(self.largest, ratio)

    def check(self) -> None:
        if self.largest is None or torch.compiler.is_compiling():
            return
        expanding = self.largest > 1 + 1e-4  # above float rounding; a contractive g stays <= Lip(g) < 1
        if expanding.any():
            raise ValueError(
                f"the residual branch is not contractive at {int(expanding.sum())} of {len(expanding)} samples: "
                f"J_g^T stretched a vector by {self.largest.max().item():.4g} > 1, so Lip(g) > 1 and the log-det "
                "series diverges there. Converge the spectral norms (iresnet.converge_spectral_norms) or use "
                "coefficients below 1"
            )


class _VectorJacobian(Protocol):
    """What :func:`_host_series` applies: :math:`u \\mapsto J^\\top u` (a :class:`Linearization`, or
    an :class:`_ExpansionWatch` around one)."""

    def vjp(self, u: Tensor) -> Tensor: ...


def _host_series(
    products: _VectorJacobian, v: Tensor, weights: Sequence[float | Tensor], neumann: bool, cayley: bool = False
) -> tuple[Tensor, Tensor]:
    """:math:`\\sum_k a_k c_k u_k` and the Neumann vector :math:`\\sum_k k a_k c_k u_{k-1}` (zero unless
    ``neumann``), :math:`u_k = J^\\top u_{k-1}`, :math:`u_0 = v`, for the given weights :math:`c_k` and
    the coefficients :math:`a_k` of :func:`term_scale`."""
    u, series, neumann_vector = v, torch.zeros_like(v), torch.zeros_like(v)
    for k, weight in enumerate(weights, start=1):
        signed = term_scale(k, cayley) * weight
        if neumann:
            neumann_vector = neumann_vector + signed * u
        u = products.vjp(u)
        series = series + signed / k * u
    return series, neumann_vector


class PowerSeries(SeriesEstimator):
    r"""The i-ResNet estimator: the series truncated after ``n_terms`` terms, traces by
    Hutchinson with ``n_probes`` probes. Biased: for :math:`\mathrm{Lip}(g) \le L` the
    truncation error is at most :math:`d \sum_{k > n} L^k / k`.

    Arguments:
        n_terms: the number of series terms.
        n_probes: Hutchinson probes per sample.
        probe: ``"gaussian"``, ``"rademacher"`` or ``"basis"`` (exact traces, ``d`` passes).
        memory_efficient: Neumann-series gradient computed in the forward pass.

    Example:
        With basis probes every trace is exact, so only the truncation is left: for
        :math:`\mathrm{Lip}(g) \le 0.5^2` and 30 terms it is below
        :math:`3 \sum_{k > 30} 0.25^k / k < 10^{-19}`, and the series is the exact log-det:

        >>> g = nn.Sequential(spectral_norm(nn.Linear(3, 16), 0.5), LipSwish(),
        ...                   spectral_norm(nn.Linear(16, 3), 0.5)).double().eval()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> exact = ResidualBlock(g, Exact())(x)[1]
        >>> series = ResidualBlock(g, PowerSeries(n_terms=30, probe="basis"))(x)[1]
        >>> torch.allclose(series, exact, rtol=0, atol=1e-6)
        True
    """

    def __init__(
        self,
        n_terms: int = 5,
        n_probes: int = 1,
        probe: str = "gaussian",
        memory_efficient: bool = False,
    ) -> None:
        super().__init__(n_probes, probe, memory_efficient)
        check_count("n_terms", n_terms)
        self.n_terms = n_terms

    def term_weights(self) -> list[float]:
        return [1.0] * self.n_terms

    def __repr__(self) -> str:
        return (
            f"PowerSeries(n_terms={self.n_terms}, n_probes={self.n_probes}, "
            f"probe={self.probe!r}, memory_efficient={self.memory_efficient})"
        )
