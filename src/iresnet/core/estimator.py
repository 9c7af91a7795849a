r"""The interface of a log-determinant estimator, and the exact estimator.

An estimator gives :math:`\log|\det(I + J_g(x))|` per sample for a residual block
:math:`x + g(x)`; :mod:`iresnet.core.logdet` lists them all and builds one from its name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from .jacobian import Linearization

__all__ = ["LogDetEstimator", "Exact", "in_graph"]


class LogDetEstimator:
    """The interface of a log-determinant estimator.

    ``estimator(g, x, gx, differentiable)`` returns :math:`\\log|\\det(I + J_g(x))|` per sample,
    shape ``(batch,)``, where ``gx = g(x)`` was computed with a graph to ``x``. With
    ``differentiable`` the result carries gradients to ``x`` and to ``g``'s parameters. With
    ``cayley=True`` it returns the log-determinant of the Cayley transform instead,
    :math:`\\log|\\det((I - J_g)(I + J_g)^{-1})|` (a :class:`~iresnet.MonotoneBlock`'s).
    """

    explicit_jacobian: bool = False
    """Whether :meth:`from_products` is implemented (the first-order path of a block)."""

    def __call__(self, g: nn.Module, x: Tensor, gx: Tensor, differentiable: bool, cayley: bool = False) -> Tensor:
        raise NotImplementedError

    def draw(self, like: Tensor, graph_free: bool = False) -> Any:
        """The random choices of one estimate that decide its amount of work (``None`` where there
        are none), drawn before the computation so that a compiled graph starts after them;
        ``graph_free`` says that the estimate will be computed without a graph."""
        return None

    def from_products(
        self, products: Linearization, x: Tensor, differentiable: bool, draws: Any, cayley: bool = False
    ) -> Tensor:
        """The same estimate from a branch's explicit Jacobian products
        (:func:`iresnet.core.jacobian.linearize`) and ``draws = self.draw(x)``: its gradient needs one
        first-order backward pass."""
        raise NotImplementedError


class Exact(LogDetEstimator):
    r"""The exact log-determinant :math:`\log|\det(I + J_g(x))|` from the full Jacobian
    (``torch.func.jacrev`` under ``vmap``) and ``slogdet``. Costs ``d`` backward passes per
    sample: for small dimensions, tests and evaluation.

    Example:
        A linear branch :math:`g(x) = W x` has the Jacobian :math:`W` everywhere, so every
        sample's log-det is :math:`\log|\det(I + W)|`, here :math:`\log(1.2 \cdot 0.7)`:

        >>> g = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = g.weight.copy_(torch.tensor([[0.2, 0.1], [0.0, -0.3]]))
        >>> _, logdet = ResidualBlock(g, Exact())(torch.randn(3, 2))
        >>> torch.allclose(logdet, torch.tensor(1.2 * 0.7).log().expand(3))
        True
    """

    def __call__(self, g: nn.Module, x: Tensor, gx: Tensor, differentiable: bool, cayley: bool = False) -> Tensor:
        if x.shape[0] == 0:  # no samples: vmap has nothing to map over
            return in_graph(x.new_zeros(0), gx) if differentiable else x.new_zeros(0)

        def g_single(sample: Tensor) -> Tensor:
            return g(sample.unsqueeze(0)).squeeze(0)

        jacobian = vmap(jacrev(g_single))(x if differentiable else x.detach())
        d = x.shape[1:].numel()
        return _logabsdet(jacobian.reshape(x.shape[0], d, d), cayley)

    explicit_jacobian = True

    def from_products(
        self, products: Linearization, x: Tensor, differentiable: bool, draws: Any, cayley: bool = False
    ) -> Tensor:
        """The Jacobian column by column, :math:`J e_i` by ``d`` tangent passes, then ``slogdet``."""
        d = x.shape[1:].numel()
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        with torch.set_grad_enabled(differentiable):
            columns = [products.jvp(e.view(1, *x.shape[1:]).expand_as(x)).flatten(1) for e in eye]
            return _logabsdet(torch.stack(columns, 2), cayley)

    def __repr__(self) -> str:
        return "Exact()"


def _logabsdet(jacobian: Tensor, cayley: bool) -> Tensor:
    r""":math:`\log|\det(I + J)|` per sample, or with ``cayley``
    :math:`\log|\det(I - J)| - \log|\det(I + J)|`, for a batch of Jacobians ``(batch, d, d)``."""
    eye = torch.eye(jacobian.shape[-1], dtype=jacobian.dtype, device=jacobian.device)
    logdet = torch.linalg.slogdet(eye + jacobian).logabsdet
    return torch.linalg.slogdet(eye - jacobian).logabsdet - logdet if cayley else logdet


def in_graph(value: Tensor, gx: Tensor) -> Tensor:
    """``value``, joined to the branch's graph with a zero gradient where no term was drawn (a
    Poisson tail of length 0 without exact terms): a log-det that ``backward`` can pass through."""
    if value.grad_fn is not None or not gx.requires_grad:
        return value
    return value + 0 * gx.flatten(1).sum(1)
