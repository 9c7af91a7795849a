r"""The invertible residual block :math:`F(x) = x + g(x)`, :math:`\mathrm{Lip}(g) < 1`: the
log-determinant by an estimator of :mod:`iresnet.core.logdet`, the inverse by the fixed-point
iteration of :mod:`iresnet.core.inverse`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .activations import LipSwish
from .certificates import design_bound
from .compiled import compiled_iteration
from .inverse import INVERSE_METHODS, MAX_ITER, InversionError, InversionReport, default_tolerances, solve_fixed_point
from .invertible import InvertibleLayer
from .jacobian import linearization_refusal, linearize
from .lipschitz import frozen_power_iteration
from .logdet import LogDetEstimator, make_estimator
from .validation import check_choice, check_count, check_input, check_interval, check_shape

__all__ = ["ResidualBlock"]


def _parameter_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        return p.dtype
    return None


def _cache_parametrizations(module: nn.Module) -> None:
    """Evaluate every parametrized tensor once, so that inside ``parametrize.cached()`` all
    later uses share it (with its graph) whatever the grad mode of the later use."""
    for m in module.modules():
        if parametrize.is_parametrized(m):
            for name in cast(nn.ModuleDict, m.parametrizations):
                getattr(m, name)


def _first_layer_mismatch(g: nn.Module, shape: tuple[int, ...]) -> str | None:
    """Why one input of ``shape`` cannot enter the branch's first ``Linear`` or ``Conv2d`` (read
    through a plain ``nn.Sequential``, elementwise activations and ``Flatten``), or ``None``."""
    flattened = False
    for layer in g if type(g) is nn.Sequential else (g,):
        if isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1:
            flattened = True
        elif isinstance(layer, nn.Linear):
            size = torch.Size(shape).numel() if flattened else shape[-1]
            if size != layer.in_features:
                return f"its first Linear takes {layer.in_features} features, the input gives {size}"
            return None
        elif isinstance(layer, nn.Conv2d):
            if flattened or len(shape) != 3 or shape[0] != layer.in_channels:
                return f"its first Conv2d takes (batch, {layer.in_channels}, H, W)"
            return None
        elif not isinstance(layer, (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity, LipSwish)):
            return None  # a layer whose input it cannot read: the branch itself will tell
    return None


class ResidualBlock(InvertibleLayer):
    r"""An invertible residual block :math:`F(x) = x + g(x)` for :math:`\mathrm{Lip}(g) < 1`.

    ``y, logdet = block(x)`` returns :math:`F(x)` and an estimate of
    :math:`\log|\det(I + J_g(x))|` per sample; ``block.inverse(y)`` solves :math:`F(x) = y` by
    the Banach fixed-point iteration (or Anderson acceleration) and raises
    :class:`~iresnet.InversionError` for samples that do not converge. The report of the last
    inversion (iterations, evaluations of ``g``, residual) is kept in ``last_inversion``.
    Under autograd the inverse is differentiable by implicit differentiation:
    :math:`\partial x / \partial y = (I + J_g)^{-1}`.

    Arguments:
        g: the residual branch, Lipschitz below 1 (see :func:`~iresnet.spectral_norm`); it must
            act on each sample independently and keep the shape. A chain of spectral-normalised
            layers whose coefficients allow :math:`\mathrm{Lip}(g) \ge 1`
            (:func:`~iresnet.core.certificates.design_bound`) is refused with ``ValueError``: nothing can
            check an arbitrary ``g``, and for one that is not contractive the inverse and the
            log-det series are wrong.
        logdet: ``"exact"``, ``"series"``, ``"roulette"``, a mapping of a name and options
            (``{"name": "series", "n_terms": 10}``), an estimator from :mod:`iresnet.core.logdet`, or
            ``None`` (no log-det, for classifiers).
        inverse_method: ``"fixed_point"`` or ``"anderson"``.
        atol, rtol: the inversion's stopping tolerances (defaults by dtype: about 1e-5 in
            float32, 1e-10 in float64).
        max_iter: the cap on fixed-point iterations.
        anderson_memory: the history length of Anderson acceleration.
        event_shape: the shape of one input, a tuple (``(3,)`` for 3 features); taken from the
            first input if ``None``.
        jacobian: how the log-det reaches ``J_g``. ``"explicit"``: matrix products and
            convolutions from the branch's forward pass (:mod:`iresnet.core.jacobian`), so training
            needs one first-order backward pass and ``torch.compile`` accepts it; raises for a
            branch or estimator it cannot serve. ``"autograd"``: vector-Jacobian products by
            ``torch.autograd.grad``, whose gradient is a double backward; works for any ``g``.
            ``"auto"`` (default): explicit where possible. ``repr(block)`` names the path taken.
        compile_inverse: evaluate ``g`` in the inverse's iterations through one compiled function
            per branch architecture, the stopping rule's arithmetic fused with it
            (:func:`iresnet.core.compiled.compiled_iteration`): the first inversion pays the
            compilation, later ones run the iterations faster.

    References:
        Behrmann et al., "Invertible Residual Networks", ICML 2019,
        https://arxiv.org/abs/1811.00995

        Chen et al., "Residual Flows for Invertible Generative Modeling", NeurIPS 2019,
        https://arxiv.org/abs/1906.02735

    Example:
        >>> g = nn.Sequential(spectral_norm(nn.Linear(2, 16), 0.9), LipSwish(),
        ...                   spectral_norm(nn.Linear(16, 2), 0.9))
        >>> block = ResidualBlock(g, logdet="exact")
        >>> x = torch.randn(8, 2)
        >>> y, logdet = block(x)
        >>> bool(torch.allclose(block.inverse(y), x, atol=1e-4))
        True
    """

    def __init__(
        self,
        g: nn.Module,
        logdet: str | Mapping[str, Any] | LogDetEstimator | None = "roulette",
        *,
        inverse_method: str = INVERSE_METHODS[0],
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int = MAX_ITER,
        anderson_memory: int = 5,
        event_shape: tuple[int, ...] | None = None,
        jacobian: str = "auto",
        compile_inverse: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(g, nn.Module):
            raise TypeError(
                "g must be an nn.Module (the residual branch, such as an nn.Sequential of spectral-normalised "
                f"layers), got {type(g).__name__}"
            )
        if event_shape is not None:
            check_shape("event_shape", event_shape)
        check_choice("inverse_method", inverse_method, INVERSE_METHODS)
        check_interval("atol", atol, 0, optional=True)
        check_interval("rtol", rtol, 0, optional=True)
        check_count("max_iter", max_iter)
        check_choice("jacobian", jacobian, ("auto", "explicit", "autograd"))
        promised = design_bound(g)
        if promised is not None and promised >= 1:
            raise ValueError(
                f"the branch's coefficients allow Lip(g) up to {promised:.4g}, and a residual block is invertible "
                "(its log-det series convergent) only for Lip(g) < 1: choose spectral-norm coefficients whose "
                "product with the activations' Lipschitz constants is below 1"
            )
        self.g = g
        self.logdet = make_estimator(logdet)
        self.inverse_method = inverse_method
        self.atol = atol
        self.rtol = rtol
        self.max_iter = max_iter
        self.anderson_memory = anderson_memory
        self.event_shape = None if event_shape is None else tuple(event_shape)
        self.last_inversion: InversionReport | None = None
        self.jacobian = jacobian
        self.compile_inverse = compile_inverse
        if jacobian == "explicit":
            self.jacobian_path  # noqa: B018 -- raises now, at construction, for a branch it cannot take

    def _explicit_refusal(self) -> str | None:
        """Why the explicit path cannot serve this block now (read at every call: hooks may come
        and go, the branch or the estimator may be replaced), or ``None``."""
        refusal = linearization_refusal(self.g)
        if refusal is not None:
            return refusal
        if self.logdet is not None and not self.logdet.explicit_jacobian:
            return f"the estimator {type(self.logdet).__name__} has no from_products"
        return None

    @property
    def jacobian_path(self) -> str:
        """``"explicit"`` or ``"autograd"``: how the log-det reaches the branch's Jacobian."""
        if self.jacobian == "autograd":
            return "autograd"
        refusal = self._explicit_refusal()
        if refusal is not None and self.jacobian == "explicit":
            raise ValueError(f"jacobian='explicit' is not possible: {refusal}; use 'auto' or 'autograd'")
        return "autograd" if refusal is not None else "explicit"

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, name, self.event_shape, _parameter_dtype(self.g))
        if self.event_shape is None:
            mismatch = _first_layer_mismatch(self.g, tuple(x.shape[1:]))
            if mismatch is not None:
                raise ValueError(f"{name}: shape {tuple(x.shape)} does not fit the branch: {mismatch}")
            self.event_shape = tuple(x.shape[1:])

    def _branch(self, x: Tensor) -> Tensor:
        gx = self.g(x)
        self._check_branch_shape(x, gx)
        return gx

    @staticmethod
    def _check_branch_shape(x: Tensor, gx: Tensor) -> None:
        if gx.shape != x.shape:
            raise ValueError(f"the residual branch g must keep the shape {tuple(x.shape)}, gave {tuple(gx.shape)}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        self._check(x, f"{type(self).__name__} input")
        gx, logdet = self._branch_and_logdet(x)
        return x + gx, logdet

    def _branch_and_logdet(self, x: Tensor, cayley: bool = False) -> tuple[Tensor, Tensor | None]:
        r""":math:`g(x)` and the estimate of :math:`\log|\det(I + J_g(x))|` (``None`` without an
        estimator), or with ``cayley`` that of :math:`\log|\det((I - J_g)(I + J_g)^{-1})|`; without
        a graph unless grad mode is on."""
        explicit = self.logdet is not None and self.jacobian_path == "explicit"
        kind = {"cayley": True} if cayley else {}  # an estimator of the residual log-det alone need not take it
        # first: under torch.compile a draw on the host stops the graph, which then starts after it
        graph_free = not torch.is_grad_enabled() or getattr(self.logdet, "memory_efficient", False)
        draws = self.logdet.draw(x, graph_free) if explicit and self.logdet is not None else None
        with parametrize.cached():
            if self.logdet is None:
                return self._branch(x), None
            differentiable = torch.is_grad_enabled()
            if explicit:
                products = linearize(self.g, x, checked=True)  # jacobian_path has just checked g
                self._check_branch_shape(x, products.output)
                return products.output, self.logdet.from_products(products, x, differentiable, draws, **kind)
            with torch.enable_grad():
                # an alias of x: the estimator's gradients with respect to it must not run hooks on x
                # (the implicit gradient of an inverse that produced x is one, a user's another)
                x_in = x.view_as(x) if differentiable and x.requires_grad else x.detach().requires_grad_()
                gx = self._branch(x_in)
                logdet = self.logdet(self.g, x_in, gx, differentiable, **kind)
        if not differentiable:
            return gx.detach(), logdet.detach()
        return gx, logdet

    def inverse(self, y: Tensor, method: str | None = None) -> Tensor:
        """The unique ``x`` with ``x + g(x) = y``; ``method`` overrides ``inverse_method`` for this call."""
        if method is not None:
            check_choice("method", method, INVERSE_METHODS)
        self._check_first(y, f"{type(self).__name__}.inverse input")
        return self._solve(y, method)

    def _check_first(self, x: Tensor, name: str) -> None:
        """:meth:`_check`; on the block's first input, also one evaluation of ``g`` without a graph
        or a power-iteration step, in which convolutions learn the input size before any weights
        are cached (:meth:`_solve`)."""
        first_input = self.event_shape is None
        self._check(x, name)
        if first_input:
            with torch.no_grad(), frozen_power_iteration(self.g):
                self.g(x)

    def _solve(self, b: Tensor, method: str | None, sign: float = 1.0) -> Tensor:
        r"""The ``w`` with :math:`w + s\,g(w) = b` for the sign :math:`s = \pm 1` (a contraction
        either way), by the block's inversion; under autograd differentiable by implicit
        differentiation. The report goes to ``last_inversion``; ``compile_inverse`` serves
        :math:`s = 1` only."""
        differentiable = torch.is_grad_enabled() and (
            b.requires_grad or any(p.requires_grad for p in self.g.parameters())
        )
        branch = self.g if sign > 0 else (lambda w: -self.g(w))
        with parametrize.cached(), frozen_power_iteration(self.g):
            _cache_parametrizations(self.g)
            iteration = None
            if self.compile_inverse and sign > 0:
                atol, rtol = self._tolerances(b.dtype)
                iteration = compiled_iteration(self.g, atol, rtol)
            with torch.no_grad():
                w, self.last_inversion = solve_fixed_point(
                    branch,
                    b,
                    method or self.inverse_method,
                    self.atol,
                    self.rtol,
                    self.max_iter,
                    self.anderson_memory,
                    iteration,
                )
            if differentiable:
                w = self._implicit_gradient(w, b, sign)
        return w

    def _tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        default_atol, default_rtol = default_tolerances(dtype)
        return (default_atol if self.atol is None else self.atol, default_rtol if self.rtol is None else self.rtol)

    def _implicit_gradient(self, w_star: Tensor, b: Tensor, sign: float) -> Tensor:
        r"""``b - s g(w*)`` (equal to ``w*`` within tolerance) whose backward pass applies
        :math:`(I + s J_g)^{-\top}` by the fixed-point iteration :math:`u = a - s J_g^\top u`;
        returned as an alias, so that a gradient with respect to the solution itself is not
        transformed: the hook acts only on its way on to ``b`` and the parameters."""
        w0 = w_star.detach().requires_grad_()
        gw0 = self.g(w0)
        w = b - sign * gw0
        atol, rtol = self._tolerances(b.dtype)

        def apply_inverse_transpose(grad: Tensor | None) -> Tensor | None:
            if grad is None:  # an undefined gradient stays undefined
                return None
            u = grad
            for _ in range(self.max_iter):
                (jt_u,) = torch.autograd.grad(gw0, w0, u, retain_graph=True)
                u_next = grad - sign * jt_u
                if ((u_next - u).abs() <= atol + rtol * u_next.abs()).all():
                    return u_next
                u = u_next
            raise InversionError(f"the implicit gradient of the inverse did not converge in {self.max_iter} iterations")

        w.register_hook(apply_inverse_transpose)
        return w.view_as(w)

    def extra_repr(self) -> str:
        path = "autograd" if self.jacobian == "autograd" or self._explicit_refusal() else "explicit"  # never raises
        return f"logdet={self.logdet!r}, jacobian={path!r}, inverse_method={self.inverse_method!r}"
