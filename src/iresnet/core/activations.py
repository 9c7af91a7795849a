r"""1-Lipschitz activations: LipSwish, and its concatenated form CLipSwish."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CLipSwish", "CLIPSWISH_CONSTANT", "LipSwish", "clipswish"]


class _LearnableBeta(nn.Module):
    """An activation's learnable :math:`\\beta > 0`, ``softplus(raw_beta)``."""

    def __init__(self, beta: float = 0.5) -> None:
        super().__init__()
        if not 0 < beta < math.inf:
            raise ValueError(f"beta must be positive and finite, got {beta}")
        # the inverse of softplus, written to stay finite for large beta
        self.raw_beta = nn.Parameter(torch.tensor(beta + math.log(-math.expm1(-beta))))

    @property
    def beta(self) -> Tensor:
        return F.softplus(self.raw_beta)


class LipSwish(_LearnableBeta):
    r"""LipSwish, :math:`\phi(z) = z \, \mathrm{sigmoid}(\beta z) / 1.1` with a learnable
    :math:`\beta > 0` (kept positive through a softplus).

    The slope of Swish :math:`z \, \mathrm{sigmoid}(\beta z)` lies in :math:`(-0.1, 1.1)` for
    every :math:`\beta > 0`, so :math:`\phi` is 1-Lipschitz; unlike ReLU or ELU its derivative
    does not saturate at 1, which keeps the log-determinant's gradient informative.

    Arguments:
        beta: the initial :math:`\beta`.

    References:
        Chen et al., "Residual Flows for Invertible Generative Modeling", NeurIPS 2019,
        https://arxiv.org/abs/1906.02735
    """

    def forward(self, z: Tensor) -> Tensor:
        # in place where autograd saves nothing: two temporaries fewer than the plain formula
        return (z * torch.sigmoid_(self.beta * z)).div_(1.1)


def _swish_slope_peak() -> float:
    r"""The largest slope of Swish :math:`s(u) = u \, \mathrm{sigmoid}(u)`,
    :math:`s'(u) = \sigma(u) (1 + u (1 - \sigma(u)))`, reached where :math:`s''(u) = \sigma'(u)
    (2 - u \tanh(u / 2)) = 0`, at :math:`u \approx 2.3994` (bisection to machine precision)."""
    low, high = 2.0, 3.0  # u tanh(u/2) - 2 changes sign once in between
    while high - low > 4 * math.ulp(high):
        middle = (low + high) / 2
        low, high = (middle, high) if middle * math.tanh(middle / 2) < 2 else (low, middle)
    u = (low + high) / 2
    sigma = 1 / (1 + math.exp(-u))
    return sigma * (1 + u * (1 - sigma))


_PEAK = _swish_slope_peak()
CLIPSWISH_CONSTANT = math.hypot(_PEAK, 1 - _PEAK)
r"""The Lipschitz constant of :math:`z \mapsto [\phi(z), \phi(-z)]` with :math:`\phi(z) = z \,
\mathrm{sigmoid}(\beta z)`, about 1.10436 for every :math:`\beta > 0` (see :class:`CLipSwish`);
divided by 1.1, the constant of the concatenated LipSwish, about 1.00397 (the paper's 1.004)."""


class CLipSwish(_LearnableBeta):
    r"""Concatenated LipSwish: :math:`\mathrm{CLipSwish}(z) = [\phi(z), \phi(-z)] / L`, with
    :math:`\phi(z) = z \, \mathrm{sigmoid}(\beta z)` (Swish, a learnable :math:`\beta > 0`)
    concatenated along dimension 1 (features, or the channels of an image), so that the output
    has twice the input's features, and :math:`L` = :data:`CLIPSWISH_CONSTANT` :math:`\approx
    1.10436` its Lipschitz constant: CLipSwish is 1-Lipschitz, and no smaller :math:`L` would do.

    The Jacobian stacks :math:`\mathrm{diag}(\phi'(z))` on :math:`-\mathrm{diag}(\phi'(-z))`, so
    :math:`J^\top J` is diagonal and the Lipschitz constant is
    :math:`\sup_z \sqrt{\phi'(z)^2 + \phi'(-z)^2}`. With :math:`u = \beta z` and
    :math:`f(u) = \sigma(u)(1 + u(1 - \sigma(u)))`, :math:`\phi'(z) = f(u)` and :math:`\phi'(-z)
    = f(-u) = 1 - f(u)`, so :math:`\beta` drops out: the supremum of :math:`f^2 + (1 - f)^2` lies
    at the extremes of :math:`f`, :math:`f(u^*) \approx 1.09984` with :math:`u^* \tanh(u^*/2) = 2`,
    and :math:`L = \sqrt{f(u^*)^2 + (1 - f(u^*))^2}` for every :math:`\beta`. In the paper's terms
    (LipSwish, Swish divided by 1.1, then concatenated) the constant is :math:`L / 1.1 \approx
    1.004`.

    Arguments:
        beta: the initial :math:`\beta`.

    References:
        Perugachi-Diaz, Tomczak, Bhulai, "Invertible DenseNets with Concatenated LipSwish",
        NeurIPS 2021, https://arxiv.org/abs/2102.02694

    Example:
        >>> act = CLipSwish()
        >>> act(torch.randn(5, 3)).shape
        torch.Size([5, 6])
    """

    def forward(self, z: Tensor) -> Tensor:
        return clipswish(z, self.beta)


def clipswish(z: Tensor, beta: Tensor) -> Tensor:
    """:class:`CLipSwish` as a function of its input and :math:`\\beta`."""
    beta_z = beta * z
    both = torch.cat([z * torch.sigmoid(beta_z), -z * torch.sigmoid(-beta_z)], dim=1)
    return both / CLIPSWISH_CONSTANT
