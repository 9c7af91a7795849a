r"""The multi-scale image flow: residual blocks at each scale, then a squeeze and half the
channels factored out to the prior (Dinh et al., Real NVP, 2017), as the density models of the
i-ResNet and Residual Flows papers are built; pre-processing (dequantisation, logit) comes first
so that the likelihood, and bits/dim, account for it."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..core.blocks import ActNorm, ResidualBlock, Sequential, Squeeze
from ..core.validation import check_count
from ..data.preprocess import Logit, UniformDequantize
from ..flows.density import DensityModel
from .branches import conv_branch, flat_branch
from .options import ImageFlowOptions

__all__ = ["MultiScale", "Shift", "image_flow"]


class Shift(nn.Module):
    """``x -> x - 0.5`` (log-det 0): centres dequantised data on ``[-0.5, 0.5)``, the i-ResNet
    pre-processing where no logit transform is used."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x - 0.5, x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y + 0.5


class MultiScale(nn.Module):
    r"""``stages[0]``, squeeze, factor out half, ``stages[1]``, ..., ``stages[-1]``; returns the
    factored-out parts and the last output flattened and concatenated, ``(batch, D)``, with the
    summed log-det (squeezes and splits have log-det 0).

    Arguments:
        stages: invertible modules, one per scale, each keeping its input's shape.
        event_shape: the ``(C, H, W)`` of one input.
        squeeze_first: squeeze before the first stage (a 1-channel image gets 4 channels).
        factor_out: factor half the channels out at each squeeze (else keep them all, as the
            Residual Flows image models do).

    The order of squeeze and split: the i-ResNet code splits a stage's ``C`` channels in half,
    factors one half out and squeezes the other; this squeezes all ``C`` first, then splits the
    ``4C``. Squeezing keeps each channel's four sub-pixels together (output channel
    ``4c + 2i + j``), so both keep the same values: the squeeze of the stage's first ``C/2``
    channels. The factored-out half holds the same values in another order, a fixed
    permutation of latent coordinates with log-det 0: the same densities, and under a learned
    per-coordinate prior the same model class.
    """

    def __init__(
        self, stages: list[nn.Module], event_shape: tuple[int, int, int], *, squeeze_first: bool, factor_out: bool
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.squeeze = Squeeze()
        self.squeeze_first = squeeze_first
        self.factor_out = factor_out
        self.event_shape = tuple(event_shape)
        self.stage_shapes = _stage_shapes(self.event_shape, len(stages), squeeze_first, factor_out)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.squeeze_first:
            x, _ = self.squeeze(x)
        parts, total = [], None
        for i, stage in enumerate(self.stages):
            x, logdet = stage(x)
            total = logdet if total is None or logdet is None else total + logdet
            if i < len(self.stages) - 1:
                x, _ = self.squeeze(x)
                if self.factor_out:
                    keep = x.shape[1] // 2
                    parts.append(x[:, keep:].flatten(1))
                    x = x[:, :keep]
        parts.append(x.flatten(1))
        return torch.cat(parts, 1), total

    def inverse(self, z: Tensor) -> Tensor:
        factored_shapes = self.stage_shapes[1:] if self.factor_out else []
        sizes = [math.prod(s) for s in factored_shapes] + [math.prod(self.stage_shapes[-1])]
        parts = list(z.split(sizes, 1))
        x = parts.pop().reshape(-1, *self.stage_shapes[-1])
        for i in reversed(range(len(self.stages))):
            if i < len(self.stages) - 1:
                if self.factor_out:
                    x = torch.cat([x, parts.pop().reshape(-1, *self.stage_shapes[i + 1])], 1)
                x = self.squeeze.inverse(x)
            x = self.stages[i].inverse(x)
        return self.squeeze.inverse(x) if self.squeeze_first else x

    def forward_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(shape),)

    def inverse_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.event_shape


def _stage_shapes(
    shape: tuple[int, int, int], n_stages: int, squeeze_first: bool, factor_out: bool = True
) -> list[tuple[int, int, int]]:
    """The shape each stage works on; between stages a squeeze and (``factor_out``) a split in half."""
    c, h, w = shape
    squeezes = n_stages - 1 + int(squeeze_first)
    if h % 2**squeezes or w % 2**squeezes:
        raise ValueError(f"an image of {h}x{w} cannot be squeezed {squeezes} times (squeeze_first={squeeze_first})")
    if squeeze_first:
        c, h, w = 4 * c, h // 2, w // 2
    shapes = [(c, h, w)]
    for _ in range(n_stages - 1):
        c, h, w = (2 if factor_out else 4) * c, h // 2, w // 2
        shapes.append((c, h, w))
    return shapes


def image_flow(
    shape: tuple[int, int, int], levels: int = 256, *, options: ImageFlowOptions | None = None, **changes: Any
) -> DensityModel:
    """A multi-scale residual flow for images of ``shape`` ``(C, H, W)`` with ``levels``
    intensity levels, taking integer images.

    Pre-processing: uniform dequantisation to ``[0, 1)`` (log-det :math:`-D \\log L`), then the
    logit transform with ``logit_alpha`` (Residual Flows) or, for ``None``, a shift to
    ``[-0.5, 0.5)`` (i-ResNet). Each of ``scales`` stages holds ``blocks`` times
    ``[ActNorm, residual block]`` with the branch ``act, 3x3, act, 1x1, act, 3x3`` (``hidden``
    channels); between stages a squeeze, and half the channels factored out to the prior if
    ``factor_out``; the last stage adds ``fc_blocks`` fully-connected blocks (``fc_hidden`` units).

    The options are those of :class:`~iresnet.models.options.ImageFlowOptions`, given as
    ``options``, as keyword arguments, or both (the keyword arguments replace those of ``options``).

    References:
        Behrmann et al., "Invertible Residual Networks", ICML 2019, https://arxiv.org/abs/1811.00995

        Chen et al., "Residual Flows for Invertible Generative Modeling", NeurIPS 2019,
        https://arxiv.org/abs/1906.02735

    Example:
        >>> model = image_flow((1, 8, 8), 17, scales=2, blocks=1, hidden=8)
        >>> model(torch.randint(0, 17, (3, 1, 8, 8))).shape
        torch.Size([3])
    """
    check_count("levels", levels, 2)
    options = ImageFlowOptions.resolve(options, changes)
    scales, coeff, logdet = options.scales, options.coeff, options.logdet
    stage_shapes = _stage_shapes(tuple(shape), scales, options.squeeze_first, options.factor_out)
    branch, block = options.branch_options(), options.block_options()
    stages = []
    for i, (c, h, w) in enumerate(stage_shapes):
        layers: list[nn.Module] = []
        for _ in range(options.blocks):
            layers += [ActNorm(c), ResidualBlock(conv_branch(c, options.hidden, coeff, **branch), logdet, **block)]
        if i == scales - 1:
            for _ in range(options.fc_blocks):
                g = flat_branch((c, h, w), options.fc_hidden, coeff, **branch)
                layers += [ActNorm(c), ResidualBlock(g, logdet, **block)]
        stages.append(Sequential(*layers))
    alpha = options.logit_alpha
    preprocess: list[nn.Module] = [UniformDequantize(levels), Shift() if alpha is None else Logit(alpha)]
    multiscale = MultiScale(stages, tuple(shape), squeeze_first=options.squeeze_first, factor_out=options.factor_out)
    return DensityModel(Sequential(*preprocess, multiscale), tuple(shape), learned_prior=options.learned_prior)
