"""The toy flow for low-dimensional data: ``blocks x [ActNorm, residual MLP block]``."""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from ..core.layers import ActNorm
from ..core.validation import check_count
from ..flows.composition import Sequential
from ..flows.density import DensityModel
from .blocks import flow_block
from .branches import dense_activation, dense_branch, dense_growth, mlp_branch
from .options import ToyFlowOptions

__all__ = ["toy_flow"]


def toy_flow(dim: int = 2, *, options: ToyFlowOptions | None = None, **changes: Any) -> DensityModel:
    """A residual flow on :math:`\\mathbb{R}^{dim}`: ``blocks`` residual blocks whose branches are
    MLPs ``dim -> hidden -> ... -> dim`` (``depth`` linear layers, coefficient ``coeff``), each
    after an ActNorm. The exact log-det is cheap for small ``dim``. With ``block="densenet"`` the
    branches are i-DenseNets' (:func:`~iresnet.models.branches.dense_branch`): ``depth - 1`` dense
    layers adding about ``hidden`` features in all, then a linear layer back to ``dim``; with
    ``block="monotone"`` or ``"implicit"`` the blocks are those of :mod:`iresnet.models.blocks`.

    The options are those of :class:`~iresnet.models.options.ToyFlowOptions`, given as
    ``options``, as keyword arguments, or both (the keyword arguments replace those of ``options``).

    Example:
        >>> model = toy_flow(2, blocks=2, hidden=16)
        >>> model(torch.randn(5, 2)).shape
        torch.Size([5])
    """
    check_count("dim", dim)
    options = ToyFlowOptions.resolve(options, changes)
    layers: list[nn.Module] = []
    for _ in range(options.blocks):
        if options.actnorm:
            layers.append(ActNorm(dim))
        branch = partial(_branch, dim, options)
        layers.append(flow_block(options.block, branch, options.logdet, **options.block_options()))
    return DensityModel(Sequential(*layers), (dim,), learned_prior=options.learned_prior)


def _branch(dim: int, options: ToyFlowOptions) -> nn.Sequential:
    if options.block == "densenet":
        n = options.depth - 1
        activation = dense_activation(options.activation)
        growth = dense_growth(options.hidden, n)
        return dense_branch(
            dim,
            growth,
            options.branch_coeff(),
            layers=n,
            activation=activation,
            power_iterations=options.power_iterations,
        )
    return mlp_branch(dim, options.hidden, options.branch_coeff(), depth=options.depth, **options.branch_options())
