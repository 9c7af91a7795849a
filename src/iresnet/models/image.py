r"""The multi-scale image flow: residual blocks at each scale, then a squeeze and half the
channels factored out to the prior (Dinh et al., Real NVP, 2017), as the density models of the
i-ResNet and Residual Flows papers are built; pre-processing (dequantisation, logit) comes first
so that the likelihood, and bits/dim, account for it."""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from ..core.layers import ActNorm
from ..core.validation import check_count
from ..data.preprocess import Logit, Shift, UniformDequantize, VariationalDequantize
from ..flows.composition import Sequential
from ..flows.density import DensityModel
from ..flows.multiscale import MultiScale, _stage_shapes
from .blocks import flow_block
from .branches import conv_branch, dense_activation, dense_branch, dense_conv_branch, dense_growth, flat_branch
from .options import ImageFlowOptions

__all__ = ["image_flow"]


def image_flow(
    shape: tuple[int, int, int], levels: int = 256, *, options: ImageFlowOptions | None = None, **changes: Any
) -> DensityModel:
    """A multi-scale residual flow for images of ``shape`` ``(C, H, W)`` with ``levels``
    intensity levels, taking integer images.

    Pre-processing: uniform dequantisation to ``[0, 1)`` (log-det :math:`-D \\log L`; or
    ``dequantization="variational"``, a learned noise density, Flow++), then the
    logit transform with ``logit_alpha`` (Residual Flows) or, for ``None``, a shift to
    ``[-0.5, 0.5)`` (i-ResNet). Each of ``scales`` stages holds ``blocks`` times
    ``[ActNorm, residual block]`` with the branch ``act, 3x3, act, 1x1, act, 3x3`` (``hidden``
    channels; with ``block="densenet"`` i-DenseNets' two dense 3x3 layers adding about ``hidden``
    channels in all, then a 1x1 convolution, :func:`~iresnet.models.branches.dense_conv_branch`);
    between stages a squeeze, and half the channels factored out to the prior if
    ``factor_out``; the last stage adds ``fc_blocks`` fully-connected blocks (``fc_hidden`` units).

    The options are those of :class:`~iresnet.models.options.ImageFlowOptions`, given as
    ``options``, as keyword arguments, or both (the keyword arguments replace those of ``options``).

    References:
        Behrmann et al., "Invertible Residual Networks", ICML 2019, https://arxiv.org/abs/1811.00995

        Chen et al., "Residual Flows for Invertible Generative Modeling", NeurIPS 2019,
        https://arxiv.org/abs/1906.02735

        Perugachi-Diaz, Tomczak, Bhulai, "Invertible DenseNets with Concatenated LipSwish",
        NeurIPS 2021, https://arxiv.org/abs/2102.02694

    Example:
        >>> model = image_flow((1, 8, 8), 17, scales=2, blocks=1, hidden=8)
        >>> model(torch.randint(0, 17, (3, 1, 8, 8))).shape
        torch.Size([3])
    """
    check_count("levels", levels, 2)
    options = ImageFlowOptions.resolve(options, changes)
    scales, logdet = options.scales, options.logdet
    channels, height, width = shape
    event_shape = (channels, height, width)
    stage_shapes = _stage_shapes(event_shape, scales, options.squeeze_first, options.factor_out)
    block = options.block_options()
    stages = []
    for i, (c, h, w) in enumerate(stage_shapes):
        layers: list[nn.Module] = []
        for _ in range(options.blocks):
            layers += [ActNorm(c), flow_block(options.block, partial(_conv_branch, c, options), logdet, **block)]
        if i == scales - 1:
            for _ in range(options.fc_blocks):
                flat = partial(_flat_branch, (c, h, w), options)
                layers += [ActNorm(c), flow_block(options.block, flat, logdet, **block)]
        stages.append(Sequential(*layers))
    alpha = options.logit_alpha
    variational = options.dequantization == "variational"
    dequantize = VariationalDequantize(levels, event_shape) if variational else UniformDequantize(levels)
    preprocess: list[nn.Module] = [dequantize, Shift() if alpha is None else Logit(alpha)]
    multiscale = MultiScale(stages, event_shape, squeeze_first=options.squeeze_first, factor_out=options.factor_out)
    return DensityModel(Sequential(*preprocess, multiscale), event_shape, learned_prior=options.learned_prior)


_DENSE_LAYERS = 2
"""The dense layers of an image flow's dense branches, in place of the bottleneck's two
hidden layers."""


def _conv_branch(channels: int, options: ImageFlowOptions) -> nn.Sequential:
    if options.block == "densenet":
        growth = dense_growth(options.hidden, _DENSE_LAYERS)
        activation = dense_activation(options.activation)
        return dense_conv_branch(
            channels,
            growth,
            options.branch_coeff(),
            layers=_DENSE_LAYERS,
            activation=activation,
            power_iterations=options.power_iterations,
        )
    return conv_branch(channels, options.hidden, options.branch_coeff(), **options.branch_options())


def _flat_branch(shape: tuple[int, int, int], options: ImageFlowOptions) -> nn.Sequential:
    if options.block == "densenet":
        growth = dense_growth(options.fc_hidden, _DENSE_LAYERS)
        activation = dense_activation(options.activation)
        dim = shape[0] * shape[1] * shape[2]
        g = dense_branch(
            dim,
            growth,
            options.branch_coeff(),
            layers=_DENSE_LAYERS,
            activation=activation,
            power_iterations=options.power_iterations,
        )
        return nn.Sequential(nn.Flatten(), *g, nn.Unflatten(1, shape))
    return flat_branch(shape, options.fc_hidden, options.branch_coeff(), **options.branch_options())
