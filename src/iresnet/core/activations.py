r"""1-Lipschitz activations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LipSwish"]


class LipSwish(nn.Module):
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

    def __init__(self, beta: float = 0.5) -> None:
        super().__init__()
        if not 0 < beta < math.inf:
            raise ValueError(f"beta must be positive and finite, got {beta}")
        # the inverse of softplus, written to stay finite for large beta
        self.raw_beta = nn.Parameter(torch.tensor(beta + math.log(-math.expm1(-beta))))

    @property
    def beta(self) -> Tensor:
        return F.softplus(self.raw_beta)

    def forward(self, z: Tensor) -> Tensor:
        # in place where autograd saves nothing: two temporaries fewer than the plain formula
        return (z * torch.sigmoid_(self.beta * z)).div_(1.1)
