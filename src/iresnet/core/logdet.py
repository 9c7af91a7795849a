r"""Estimators of :math:`\log|\det(I + J_g(x))|` for a residual block :math:`x + g(x)`.

For :math:`\mathrm{Lip}(g) < 1` the log-determinant is a convergent power series,

.. math:: \log\det(I + J_g) = \sum_{k \ge 1} \frac{(-1)^{k+1}}{k} \mathrm{tr}(J_g^k),

whose traces Hutchinson's estimator :math:`\mathrm{tr}(A) = \mathbb{E}[v^\top A v]` reduces to
``k`` vector-Jacobian products each. :class:`PowerSeries` truncates the series (biased, the
i-ResNet estimator); :class:`Roulette` draws the number of terms at random and reweights each
by its survival probability (unbiased, the Residual Flows estimator); :class:`Exact` builds the
Jacobian with :mod:`torch.func` for small dimensions.

With ``memory_efficient=True`` the gradient comes from the Neumann series
:math:`\partial_\theta \log\det(I + J_g) = \sum_{k \ge 0} (-1)^k \mathrm{tr}(J_g^k \, \partial_\theta
J_g)`, estimated with the same probe and terms, and is computed during the forward pass so the
series' graph is released at once: memory no longer grows with the number of terms. The value
returned is always the estimate itself, never the gradient surrogate.

References:
    Behrmann et al., "Invertible Residual Networks", ICML 2019, https://arxiv.org/abs/1811.00995

    Chen et al., "Residual Flows for Invertible Generative Modeling", NeurIPS 2019,
    https://arxiv.org/abs/1906.02735

    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", 1989
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch._higher_order_ops import while_loop
from torch.func import jacrev, vmap

from .jacobian import Linearization
from .validation import check_choice, check_count, check_flag, check_interval

__all__ = [
    "ESTIMATORS",
    "LogDetEstimator",
    "Exact",
    "PowerSeries",
    "Roulette",
    "PROBES",
    "make_estimator",
    "update_spec",
]

PROBES = ("gaussian", "rademacher", "basis")
"""The Hutchinson probes: Gaussian, Rademacher, or every basis vector in turn (exact traces)."""


class LogDetEstimator:
    """The interface of a log-determinant estimator.

    ``estimator(g, x, gx, differentiable)`` returns :math:`\\log|\\det(I + J_g(x))|` per sample,
    shape ``(batch,)``, where ``gx = g(x)`` was computed with a graph to ``x``. With
    ``differentiable`` the result carries gradients to ``x`` and to ``g``'s parameters.
    """

    explicit_jacobian: bool = False
    """Whether :meth:`from_products` is implemented (the first-order path of a block)."""

    def __call__(self, g: nn.Module, x: Tensor, gx: Tensor, differentiable: bool) -> Tensor:
        raise NotImplementedError

    def draw(self, like: Tensor, graph_free: bool = False) -> Any:
        """The random choices of one estimate that decide its amount of work (``None`` where there
        are none), drawn before the computation so that a compiled graph starts after them;
        ``graph_free`` says that the estimate will be computed without a graph."""
        return None

    def from_products(self, products: Linearization, x: Tensor, differentiable: bool, draws: Any) -> Tensor:
        """The same estimate from a branch's explicit Jacobian products
        (:func:`iresnet.core.jacobian.linearize`) and ``draws = self.draw(x)``: its gradient needs one
        first-order backward pass."""
        raise NotImplementedError


class Exact(LogDetEstimator):
    """The exact log-determinant from the full Jacobian (``torch.func.jacrev`` under ``vmap``)
    and ``slogdet``. Costs ``d`` backward passes per sample: for small dimensions, tests and
    evaluation."""

    def __call__(self, g: nn.Module, x: Tensor, gx: Tensor, differentiable: bool) -> Tensor:
        if x.shape[0] == 0:  # no samples: vmap has nothing to map over
            return _in_graph(x.new_zeros(0), gx) if differentiable else x.new_zeros(0)

        def g_single(sample: Tensor) -> Tensor:
            return g(sample.unsqueeze(0)).squeeze(0)

        jacobian = vmap(jacrev(g_single))(x if differentiable else x.detach())
        d = x.shape[1:].numel()
        jacobian = jacobian.reshape(x.shape[0], d, d)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        return torch.linalg.slogdet(eye + jacobian).logabsdet

    explicit_jacobian = True

    def from_products(self, products: Linearization, x: Tensor, differentiable: bool, draws: Any) -> Tensor:
        """The Jacobian column by column, :math:`J e_i` by ``d`` tangent passes, then ``slogdet``."""
        d = x.shape[1:].numel()
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        with torch.set_grad_enabled(differentiable):
            columns = [products.jvp(e.view(1, *x.shape[1:]).expand_as(x)).flatten(1) for e in eye]
            return torch.linalg.slogdet(eye + torch.stack(columns, 2)).logabsdet

    def __repr__(self) -> str:
        return "Exact()"


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


class _Series(LogDetEstimator):
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
        self, products: Linearization, v: Tensor, neumann: bool, tail_length: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The series and the Neumann vector for a tail length drawn on the device."""
        raise NotImplementedError

    explicit_jacobian = True

    def from_products(self, products: Linearization, x: Tensor, differentiable: bool, draws: Any) -> Tensor:
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
        watched = products if differentiable else _ExpansionWatch(products)
        for weights in draws:
            for v in _probes(x, self.probe):
                with torch.set_grad_enabled(differentiable and not neumann):
                    if isinstance(weights, Tensor):  # a tail length drawn on the device
                        series, neumann_vector = self.device_series(products, v, neumann, weights)
                    else:
                        series, neumann_vector = _host_series(watched, v, weights, neumann)
                    value = value + _per_sample_dot(series, v)
                if neumann:
                    surrogate = surrogate + products.surrogate_gradient(neumann_vector, v)
        value = value / self.n_probes
        if not differentiable:
            watched.check()
        if not neumann:
            return _in_graph(value, products.output) if differentiable else value.detach()
        return value.detach() + surrogate / self.n_probes

    def __call__(self, g: nn.Module, x: Tensor, gx: Tensor, differentiable: bool) -> Tensor:
        params = [p for p in g.parameters() if p.requires_grad]
        neumann = self.memory_efficient and differentiable and (x.requires_grad or params)
        create_graph = differentiable and not neumann
        value = x.new_zeros(x.shape[0])
        surrogate = x.new_zeros(x.shape[0])
        expansion = _ExpansionWatch()
        for _ in range(self.n_probes):
            weights = self.term_weights()
            for v in _probes(x, self.probe):
                vjp = v  # v^T J^{k-1}
                neumann_vector = torch.zeros_like(v)
                for k, weight in enumerate(weights, start=1):
                    sign = 1.0 if k % 2 else -1.0
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
            return _in_graph(value, gx) if differentiable else value.detach()
        inputs = ([x] if x.requires_grad else []) + params
        grads = torch.autograd.grad(surrogate.sum() / self.n_probes, inputs, retain_graph=True, allow_unused=True)
        grads = list(grads) if x.requires_grad else [None, *grads]
        return _StoredGradient.apply(value.detach(), grads, x, *params)


class _ExpansionWatch:
    r"""Watches the series' products :math:`u_k = J^\top u_{k-1}` for proof that ``g`` is not
    contractive: :math:`\|u_k\| / \|u_{k-1}\| \le \|J_g(x)\| \le \mathrm{Lip}(g)`, so a ratio
    above 1 shows :math:`\mathrm{Lip}(g) > 1`, where the series diverges or means nothing.
    :meth:`check` raises then. Wraps ``products`` (for :func:`_host_series`) or is fed pairs."""

    def __init__(self, products: Linearization | None = None) -> None:
        self.products = products
        self.largest: Tensor | None = None

    def vjp(self, u: Tensor) -> Tensor:
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


def _in_graph(value: Tensor, gx: Tensor) -> Tensor:
    """``value``, joined to the branch's graph with a zero gradient where no term was drawn (a
    Poisson tail of length 0 without exact terms): a log-det that ``backward`` can pass through."""
    if value.grad_fn is not None or not gx.requires_grad:
        return value
    return value + 0 * gx.flatten(1).sum(1)


def _host_series(
    products: Linearization, v: Tensor, weights: Sequence[float] | Sequence[Tensor], neumann: bool
) -> tuple[Tensor, Tensor]:
    """:math:`\\sum_k (-1)^{k+1} c_k u_k / k` and the Neumann vector
    :math:`\\sum_k (-1)^{k+1} c_k u_{k-1}` (zero unless ``neumann``), :math:`u_k = J^\\top u_{k-1}`,
    :math:`u_0 = v`, for the given weights :math:`c_k`."""
    u, series, neumann_vector = v, torch.zeros_like(v), torch.zeros_like(v)
    for k, weight in enumerate(weights, start=1):
        signed = weight if k % 2 else -weight
        if neumann:
            neumann_vector = neumann_vector + signed * u
        u = products.vjp(u)
        series = series + signed / k * u
    return series, neumann_vector


class PowerSeries(_Series):
    """The i-ResNet estimator: the series truncated after ``n_terms`` terms, traces by
    Hutchinson with ``n_probes`` probes. Biased: for :math:`\\mathrm{Lip}(g) \\le L` the
    truncation error is at most :math:`d \\sum_{k > n} L^k / k`.

    Arguments:
        n_terms: the number of series terms.
        n_probes: Hutchinson probes per sample.
        probe: ``"gaussian"``, ``"rademacher"`` or ``"basis"`` (exact traces, ``d`` passes).
        memory_efficient: Neumann-series gradient computed in the forward pass.
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


class Roulette(_Series):
    """The Residual Flows estimator, unbiased: the first ``n_exact_terms`` terms always, then
    a random number ``N`` more, term ``n_exact_terms + m`` weighted by ``1 / P(N >= m)``.

    ``N`` is geometric on ``{1, 2, ...}`` with success probability ``p``
    (:math:`P(N \\ge m) = (1-p)^{m-1}`, mean ``1/p``) or Poisson with mean ``rate``.

    Arguments:
        n_exact_terms: terms computed on every call.
        distribution: ``"geometric"`` or ``"poisson"``.
        p: the geometric distribution's success probability.
        rate: the Poisson distribution's mean.
        n_probes: Hutchinson probes (each with its own draw of ``N``).
        probe: ``"gaussian"``, ``"rademacher"`` or ``"basis"`` (exact traces, ``d`` passes).
        memory_efficient: Neumann-series gradient computed in the forward pass.
    """

    def __init__(
        self,
        n_exact_terms: int = 2,
        distribution: str = "geometric",
        p: float = 0.5,
        rate: float = 2.0,
        n_probes: int = 1,
        probe: str = "gaussian",
        memory_efficient: bool = False,
    ) -> None:
        super().__init__(n_probes, probe, memory_efficient)
        check_count("n_exact_terms", n_exact_terms, 0)
        check_choice("distribution", distribution, ("geometric", "poisson"))
        check_interval("p", p, 0, 1)
        check_interval("rate", rate, 0)
        self.n_exact_terms = n_exact_terms
        self.distribution = distribution
        self.p = p
        self.rate = rate

    def draw_tail_length(self) -> int:
        """A draw of ``N`` from torch's generator (so ``torch.manual_seed`` fixes it)."""
        if self.distribution == "geometric":
            return int(torch.empty(()).geometric_(self.p))
        return int(torch.poisson(torch.tensor(float(self.rate))))

    def survival(self, m: int) -> float:
        """:math:`P(N \\ge m)` for ``m >= 1``."""
        return self.survival_tensor(torch.tensor(float(m), dtype=torch.float64)).item()

    def survival_tensor(self, m: Tensor) -> Tensor:
        """:math:`P(N \\ge m)` elementwise, for ``m >= 1``: :math:`(1 - p)^{m-1}`, or for the Poisson
        distribution the regularised lower incomplete gamma function :math:`P(m, \\lambda)`, which
        keeps its relative precision where :math:`1 - P(N < m)` would cancel to nothing."""
        if self.distribution == "geometric":
            return torch.exp((m - 1) * math.log1p(-self.p))
        return torch.special.gammainc(m, torch.tensor(self.rate, dtype=m.dtype, device=m.device))

    def _device_tail_length(self, like: Tensor) -> Tensor:
        """A draw of ``N`` as a 0-d integer tensor on ``like``'s device, without a host sync:
        geometric by inversion, :math:`N = \\lfloor \\log V / \\log(1 - p) \\rfloor + 1` with
        :math:`V` uniform on :math:`(0, 1]`. In float64 whatever ``like``'s dtype: a float32 uniform
        would cap ``N`` near 25 (its smallest step is :math:`2^{-24}`), truncating the series."""
        if self.distribution == "geometric":
            v = 1 - torch.rand((), dtype=torch.float64, device=like.device)
            return (torch.log(v) / math.log1p(-self.p)).floor().long() + 1
        return torch.poisson(torch.full((), self.rate, dtype=torch.float64, device=like.device)).long()

    def device_series(
        self, products: Linearization, v: Tensor, neumann: bool, tail_length: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The sums of :meth:`_Series.from_products` for one probe with the tail length drawn on
        the device (:meth:`draw`) and the terms in a ``while_loop``: one compiled graph serves
        every draw, with no host sync. Only for a series without a graph (the Neumann path, or no
        gradient). The weights are computed in float64."""
        n_terms = self.n_exact_terms + tail_length
        products.cache_factors()  # the loop's body must not change Python state

        def more_terms(k: Tensor, u: Tensor, series: Tensor, *neumann_vector: Tensor) -> Tensor:
            return k <= n_terms

        def term(k: Tensor, u: Tensor, series: Tensor, *neumann_vector: Tensor) -> tuple[Tensor, ...]:
            m = (k - self.n_exact_terms).double()
            weight = torch.where(m >= 1, 1 / self.survival_tensor(m.clamp(min=1)), 1.0)
            signed = torch.where(k % 2 == 1, weight, -weight).to(v.dtype)
            neumann_vector = tuple(w + signed * u for w in neumann_vector)
            u = products.vjp(u)
            return k + 1, u, series + signed / k * u, *neumann_vector

        # the Neumann vector is carried only when wanted: a carry returned unchanged would alias
        start = (torch.ones((), dtype=torch.long, device=v.device), v.clone(), torch.zeros_like(v))
        if neumann:
            start += (torch.zeros_like(v),)
        _, _, series, *neumann_vector = while_loop(more_terms, term, start)
        return series, neumann_vector[0] if neumann else torch.zeros_like(v)

    def term_weights(self) -> list[float]:
        tail = self.draw_tail_length()
        return [1.0] * self.n_exact_terms + [1.0 / self.survival(m) for m in range(1, tail + 1)]

    def draw(self, like: Tensor, graph_free: bool = False) -> Sequence[Sequence[float] | Sequence[Tensor] | Tensor]:
        """Each probe's term weights. Under ``torch.compile``, for a series computed
        without a graph (``graph_free``), each probe's tail length as a 0-d tensor drawn on the
        device, in the graph (:meth:`device_series` sums the terms). Otherwise the weights are
        drawn outside the graph, as tensors, with each tail padded with zero weights to the next
        power of two, so that one compiled graph serves every draw of its bucket instead of one
        graph per draw. Terms of weight zero add nothing: the estimate stays unbiased, unlike a
        cap on the number of terms."""
        if not torch.compiler.is_compiling():
            return super().draw(like)
        if graph_free:
            return [self._device_tail_length(like) for _ in range(self.n_probes)]
        return self._bucketed_draw(like)

    @torch.compiler.disable
    def _bucketed_draw(self, like: Tensor) -> tuple[tuple[Tensor, ...], ...]:
        """The host's draws, each padded to its bucket (see :meth:`draw`)."""
        draws = []
        for weights in super().draw(like):
            tail = len(weights) - self.n_exact_terms
            padded_tail = 0 if tail == 0 else 1 << (tail - 1).bit_length()
            padded = torch.tensor(weights + [0.0] * (padded_tail - tail), dtype=like.dtype, device=like.device)
            draws.append(padded.unbind())
        return tuple(draws)

    def __repr__(self) -> str:
        tail = f"p={self.p}" if self.distribution == "geometric" else f"rate={self.rate}"
        return (
            f"Roulette(n_exact_terms={self.n_exact_terms}, distribution={self.distribution!r}, "
            f"{tail}, n_probes={self.n_probes}, probe={self.probe!r}, "
            f"memory_efficient={self.memory_efficient})"
        )


_BY_NAME: dict[str, Callable[..., LogDetEstimator]] = {
    "exact": Exact,
    "series": PowerSeries,
    "roulette": Roulette,
}

ESTIMATORS = tuple(_BY_NAME)
"""The estimators' names, as a spec gives them to :func:`make_estimator`."""


def make_estimator(
    spec: str | Mapping[str, Any] | LogDetEstimator | None, setting: str = "logdet"
) -> LogDetEstimator | None:
    """An estimator from its name (``"exact"``, ``"series"``, ``"roulette"``, with default
    options), from a mapping of the name and options (``{"name": "series", "n_terms": 10}``,
    as configuration files give it), an estimator instance (returned as is) or ``None``.
    ``ValueError`` names ``setting``, the option and the choices for an unknown name or option,
    and the option and its value for a bad value.

    >>> make_estimator({"name": "series", "n_term": 10})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: logdet: unknown option 'n_term' of the 'series' estimator; its options: n_terms, n_probes, ...
    """
    if spec is None or isinstance(spec, LogDetEstimator):
        return spec
    options: dict[str, Any] = {}
    name = spec
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
    if not isinstance(name, str) or name not in _BY_NAME:
        shape = "; a mapping needs its 'name'" if isinstance(spec, Mapping) else ""
        raise ValueError(
            f"{setting} must be one of {', '.join(map(repr, ESTIMATORS))}, a mapping of a name and options, an "
            f"estimator or null, got {spec!r}{shape}"
        )
    known = list(inspect.signature(_BY_NAME[name]).parameters)
    unknown = [key for key in options if key not in known]
    if unknown:
        choices = f"its options: {', '.join(known)}" if known else "it takes none"
        raise ValueError(f"{setting}: unknown option {unknown[0]!r} of the {name!r} estimator; {choices}")
    try:
        return _BY_NAME[name](**options)
    except ValueError as error:
        raise ValueError(f"{setting}: {error}") from None


def update_spec(
    base: str | Mapping[str, Any] | LogDetEstimator | None, update: str | Mapping[str, Any] | LogDetEstimator | None
) -> str | dict[str, Any] | LogDetEstimator | None:
    """The estimator spec ``base`` updated by ``update`` (each as :func:`make_estimator` takes it).

    Options belong to an estimator: while the estimator stays the same (``update`` names it, or
    is a mapping without a ``name``) its options in ``base`` stay unless ``update`` gives them;
    another name replaces the whole spec, since the first estimator's options do not apply to
    it. An estimator instance or ``None`` replaces it too.

    >>> base = {"name": "roulette", "distribution": "poisson", "memory_efficient": True}
    >>> update_spec(base, {"n_exact_terms": 5})
    {'name': 'roulette', 'distribution': 'poisson', 'memory_efficient': True, 'n_exact_terms': 5}
    >>> update_spec(base, "roulette") == base, update_spec(base, {"name": "series", "n_terms": 3})
    (True, {'name': 'series', 'n_terms': 3})
    """
    current = {"name": base} if isinstance(base, str) else base
    new = {"name": update} if isinstance(update, str) else update
    if not isinstance(new, Mapping):
        return new
    if not isinstance(current, Mapping) or new.get("name", current.get("name")) != current.get("name"):
        return dict(new) if isinstance(update, Mapping) else update
    merged = {**current, **new}
    return merged["name"] if list(merged) == ["name"] else merged
