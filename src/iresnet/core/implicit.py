r"""The implicit block of Implicit Normalizing Flows: :math:`z = F(x)` defined by
:math:`x + g_x(x) = z + g_z(z)`, both branches contractive.

:math:`F = (I + g_z)^{-1} \circ (I + g_x)`: a residual block, then the inverse of another. Its
log-determinant is the difference of the two residual ones,

.. math:: \log|\det J_F(x)| = \log\det(I + J_{g_x}(x)) - \log\det(I + J_{g_z}(z)),

each by our estimators; the forward pass solves a fixed point (Banach or Anderson, raising
:class:`~iresnet.InversionError` on failure) and differentiates through it implicitly, and so
does the inverse, :math:`x = (I + g_x)^{-1}(z + g_z(z))`. The function class is strictly larger
than that of residual blocks: a single implicit block represents maps that no fixed number of
residual blocks can (Lu et al., theorem 2); its Lipschitz constant reaches
:math:`(1 + L_x) / (1 - L_z)`.

References:
    Lu, Chen, Li, Wang, Zhu, "Implicit Normalizing Flows", ICLR 2021,
    https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .inverse import INVERSE_METHODS
from .invertible import InvertibleLayer
from .lipschitz import frozen_power_iteration
from .logdet import LogDetEstimator
from .residual import ResidualBlock, _cache_parametrizations
from .validation import check_choice

__all__ = ["ImplicitBlock"]


class ImplicitBlock(InvertibleLayer):
    r"""The implicit block :math:`z = F(x)`, :math:`x + g_x(x) = z + g_z(z)`, for
    :math:`\mathrm{Lip}(g_x), \mathrm{Lip}(g_z) < 1` (the module's maths).

    Two :class:`~iresnet.ResidualBlock` s hold the branches, ``explicit`` (``g_x``) and
    ``implicit`` (``g_z``), with the same estimator and inversion settings (the keyword arguments
    of :class:`~iresnet.ResidualBlock`). ``y, logdet = block(x)`` returns ``z`` and
    :math:`\log\det(I + J_{g_x}(x)) - \log\det(I + J_{g_z}(z))`; ``block.inverse(z)`` returns ``x``.
    Each direction solves one fixed point; each inner block's ``last_inversion`` reports its last.

    References:
        Lu, Chen, Li, Wang, Zhu, "Implicit Normalizing Flows", ICLR 2021,
        https://arxiv.org/abs/2103.09527

    Example:
        Linear branches :math:`g_x = a I`, :math:`g_z = b I` give :math:`z = \frac{1 + a}{1 + b} x`;
        for :math:`a = 0.5`, :math:`b = -0.5` a 3-fold stretch, :math:`\log|\det| = 2 \log 3`:

        >>> import math
        >>> g_x, g_z = nn.Linear(2, 2, bias=False).double(), nn.Linear(2, 2, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = g_x.weight.copy_(0.5 * torch.eye(2)), g_z.weight.copy_(-0.5 * torch.eye(2))
        >>> block = ImplicitBlock(g_x, g_z, Exact())
        >>> x = torch.ones(1, 2, dtype=torch.float64)
        >>> z, logdet = block(x)
        >>> torch.allclose(z, 3 * x), abs(logdet.item() - 2 * math.log(3)) < 1e-8
        (True, True)
        >>> torch.allclose(block.inverse(z), x)
        True
    """

    def __init__(
        self,
        g_x: nn.Module,
        g_z: nn.Module,
        logdet: str | Mapping[str, Any] | LogDetEstimator | None = "roulette",
        **block_options: Any,
    ) -> None:
        super().__init__()
        self.explicit = ResidualBlock(g_x, logdet, **block_options)
        self.implicit = ResidualBlock(g_z, logdet, **block_options)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        h, logdet_x = self.explicit(x)
        implicit = self.implicit
        implicit._check_first(h, "ImplicitBlock's implicit branch input")
        with parametrize.cached():
            _cache_parametrizations(implicit.g)  # one weight (one power-iteration step) for the solve and the log-det
            z = implicit._solve(h, None)
            _, logdet_z = implicit._branch_and_logdet(z)
        if logdet_x is None or logdet_z is None:
            return z, None
        return z, logdet_x - logdet_z

    def inverse(self, z: Tensor, method: str | None = None) -> Tensor:
        """The ``x`` with :math:`x + g_x(x) = z + g_z(z)`; ``method`` overrides ``inverse_method``
        for this call."""
        if method is not None:
            check_choice("method", method, INVERSE_METHODS)
        implicit = self.implicit
        implicit._check_first(z, "ImplicitBlock.inverse input")
        with parametrize.cached(), frozen_power_iteration(implicit.g):
            h = z + implicit._branch(z)
        return self.explicit.inverse(h, method)

    def extra_repr(self) -> str:
        return "x + g_x(x) = z + g_z(z)"
