"""The toy flow for low-dimensional data: ``blocks x [ActNorm, residual MLP block]``."""

from __future__ import annotations

from typing import Any

from ..core.layers import ActNorm
from ..core.logdet import LogDetEstimator
from ..core.residual import ResidualBlock
from ..core.validation import check_coeff, check_count, check_flag
from ..flows.composition import Sequential
from ..flows.density import DensityModel
from .branches import mlp_branch

__all__ = ["toy_flow"]


def toy_flow(
    dim: int = 2,
    *,
    blocks: int = 8,
    hidden: int = 128,
    depth: int = 3,
    coeff: float = 0.9,
    activation: str = "lipswish",
    logdet: str | dict[str, Any] | LogDetEstimator = "exact",
    power_iterations: int = 1,
    actnorm: bool = True,
    learned_prior: bool = False,
) -> DensityModel:
    """A residual flow on :math:`\\mathbb{R}^{dim}`: ``blocks`` residual blocks whose branches are
    MLPs ``dim -> hidden -> ... -> dim`` (``depth`` linear layers, coefficient ``coeff``), each
    after an ActNorm. The exact log-det is cheap for small ``dim``.

    Example:
        >>> model = toy_flow(2, blocks=2, hidden=16)
        >>> model(torch.randn(5, 2)).shape
        torch.Size([5])
    """
    for name, value in {"dim": dim, "blocks": blocks, "hidden": hidden, "depth": depth}.items():
        check_count(name, value)
    check_count("power_iterations", power_iterations)
    check_coeff(coeff)
    check_flag("actnorm", actnorm)
    check_flag("learned_prior", learned_prior)
    layers = []
    for _ in range(blocks):
        if actnorm:
            layers.append(ActNorm(dim))
        g = mlp_branch(dim, hidden, coeff, depth=depth, activation=activation, power_iterations=power_iterations)
        layers.append(ResidualBlock(g, logdet))
    return DensityModel(Sequential(*layers), (dim,), learned_prior=learned_prior)
