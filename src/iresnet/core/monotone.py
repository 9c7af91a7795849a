r"""The monotone (Cayley) block of Monotone Flows: a bijection built from a contraction ``g``
that is not held to :math:`\mathrm{Lip}(F - I) < 1`.

For :math:`\mathrm{Lip}(g) < 1`, :math:`I + g` is strongly monotone, and the Cayley transform
of the monotone operator (scaled so that it keeps volumes comparable) is

.. math:: F(x) = \tfrac{1}{\sqrt 2}\,(w - g(w)), \qquad w + g(w) = \sqrt 2\, x,

with the inverse :math:`x = \tfrac{1}{\sqrt 2}(w + g(w))`, :math:`w - g(w) = \sqrt 2\, y`: a
fixed-point solve each way. Its Jacobian is :math:`(I - J_g(w))(I + J_g(w))^{-1}`, whose
singular values range over :math:`[(1 - L)/(1 + L), (1 + L)/(1 - L)]` for
:math:`L = \mathrm{Lip}(g)`: with :math:`L = 0.9` the block stretches up to 19-fold, where a
residual block :math:`x + g(x)` stops at 1.9. Its log-determinant is the odd part of the
residual series,

.. math:: \log|\det J_F| = \log\det(I - J_g) - \log\det(I + J_g)
          = -2 \sum_{k \text{ odd}} \frac{\mathrm{tr}(J_g(w)^k)}{k},

estimated by the same estimators (truncated, roulette, exact) from the same products.

References:
    Ahn, Kim, Hong, Kim, "Invertible Monotone Operators for Normalizing Flows", NeurIPS 2022,
    https://arxiv.org/abs/2210.08176
"""

from __future__ import annotations

import math

from torch import Tensor
from torch.nn.utils import parametrize

from .inverse import INVERSE_METHODS
from .lipschitz import frozen_power_iteration
from .residual import ResidualBlock, _cache_parametrizations
from .validation import check_choice

__all__ = ["MonotoneBlock"]

_ROOT2 = math.sqrt(2)


class MonotoneBlock(ResidualBlock):
    r"""The monotone block :math:`F(x) = (w - g(w)) / \sqrt 2` with :math:`w + g(w) = \sqrt 2 x`,
    for :math:`\mathrm{Lip}(g) < 1` (the module's maths).

    ``y, logdet = block(x)`` solves for ``w`` (the block's inversion settings, implicit
    gradients, :class:`~iresnet.InversionError` when a sample does not converge) and estimates
    :math:`\log|\det J_F(x)| = -2 \sum_{k \text{ odd}} \mathrm{tr}(J_g(w)^k) / k`;
    ``block.inverse(y)`` solves :math:`w - g(w) = \sqrt 2 y`. Both directions cost one
    fixed-point solve; ``last_inversion`` reports the last. The arguments are those of
    :class:`~iresnet.ResidualBlock`; ``compile_inverse`` serves the forward solve. An estimator
    must take ``cayley=True`` (those of :mod:`iresnet.core.logdet` do).

    References:
        Ahn, Kim, Hong, Kim, "Invertible Monotone Operators for Normalizing Flows", NeurIPS 2022,
        https://arxiv.org/abs/2210.08176

    Example:
        A linear branch :math:`g(x) = a x` gives :math:`F(x) = \frac{1 - a}{1 + a} x`: for
        :math:`a = -0.6` a 4-fold stretch, and the log-det :math:`2 \log 4`:

        >>> g = nn.Linear(2, 2, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = g.weight.copy_(-0.6 * torch.eye(2, dtype=torch.float64))
        >>> block = MonotoneBlock(g, Exact())
        >>> x = torch.ones(1, 2, dtype=torch.float64)
        >>> y, logdet = block(x)
        >>> torch.allclose(y, 4 * x), round(logdet.item() - 2 * math.log(4), 10)
        (True, 0.0)
        >>> torch.allclose(block.inverse(y), x)
        True
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        self._check_first(x, "MonotoneBlock input")
        with parametrize.cached():
            _cache_parametrizations(self.g)  # one weight (one power-iteration step) for the solve and the log-det
            w = self._solve(_ROOT2 * x, None)
            gw, logdet = self._branch_and_logdet(w, cayley=True)
        return (w - gw) / _ROOT2, logdet

    def inverse(self, y: Tensor, method: str | None = None) -> Tensor:
        r"""The ``x`` with :math:`F(x) = y`: :math:`(w + g(w)) / \sqrt 2` for :math:`w - g(w) = \sqrt 2 y`;
        ``method`` overrides ``inverse_method`` for this call."""
        if method is not None:
            check_choice("method", method, INVERSE_METHODS)
        self._check_first(y, "MonotoneBlock.inverse input")
        with parametrize.cached(), frozen_power_iteration(self.g):
            _cache_parametrizations(self.g)
            w = self._solve(_ROOT2 * y, method, sign=-1.0)
            return (w + self._branch(w)) / _ROOT2
