r"""The multi-scale image flow: residual blocks at each scale, then a squeeze and half the
channels factored out to the prior (Dinh et al., Real NVP, 2017), as the density models of the
i-ResNet and Residual Flows papers are built; pre-processing (dequantisation, logit) comes first
so that the likelihood, and bits/dim, account for it."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.layers import ActNorm
from ..core.logdet import LogDetEstimator
from ..core.residual import ResidualBlock
from ..core.validation import check_coeff, check_count, check_flag
from ..data.preprocess import Logit, Shift, UniformDequantize
from ..flows.composition import Sequential
from ..flows.density import DensityModel
from ..flows.multiscale import MultiScale, _stage_shapes
from .branches import conv_branch, flat_branch

__all__ = ["image_flow"]


def image_flow(
    shape: tuple[int, int, int],
    levels: int = 256,
    *,
    scales: int = 3,
    blocks: int = 4,
    hidden: int = 64,
    coeff: float = 0.9,
    activation: str = "lipswish",
    logdet: str | dict[str, Any] | LogDetEstimator = "roulette",
    power_iterations: int = 1,
    logit_alpha: float | None = 0.05,
    squeeze_first: bool = False,
    factor_out: bool = True,
    fc_blocks: int = 0,
    fc_hidden: int = 128,
    learned_prior: bool = False,
) -> DensityModel:
    """A multi-scale residual flow for images of ``shape`` ``(C, H, W)`` with ``levels``
    intensity levels, taking integer images.

    Pre-processing: uniform dequantisation to ``[0, 1)`` (log-det :math:`-D \\log L`), then the
    logit transform with ``logit_alpha`` (Residual Flows) or, for ``None``, a shift to
    ``[-0.5, 0.5)`` (i-ResNet). Each of ``scales`` stages holds ``blocks`` times
    ``[ActNorm, residual block]`` with the branch ``act, 3x3, act, 1x1, act, 3x3`` (``hidden``
    channels); between stages a squeeze, and half the channels factored out to the prior if
    ``factor_out``; the last stage adds ``fc_blocks`` fully-connected blocks (``fc_hidden`` units).

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
    for name, value in {"scales": scales, "blocks": blocks, "hidden": hidden, "fc_hidden": fc_hidden}.items():
        check_count(name, value)
    check_count("fc_blocks", fc_blocks, 0)
    check_count("power_iterations", power_iterations)
    check_coeff(coeff)
    if logit_alpha is not None and (not isinstance(logit_alpha, (int, float)) or not 0 < logit_alpha < 0.5):
        raise ValueError(f"logit_alpha must be a number in (0, 0.5), or null for no logit, got {logit_alpha!r}")
    check_flag("squeeze_first", squeeze_first)
    check_flag("factor_out", factor_out)
    check_flag("learned_prior", learned_prior)
    stage_shapes = _stage_shapes(tuple(shape), scales, squeeze_first, factor_out)
    options = {"activation": activation, "power_iterations": power_iterations}
    stages = []
    for i, (c, h, w) in enumerate(stage_shapes):
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [ActNorm(c), ResidualBlock(conv_branch(c, hidden, coeff, **options), logdet)]
        if i == scales - 1:
            for _ in range(fc_blocks):
                layers += [ActNorm(c), ResidualBlock(flat_branch((c, h, w), fc_hidden, coeff, **options), logdet)]
        stages.append(Sequential(*layers))
    preprocess: list[nn.Module] = [UniformDequantize(levels), Shift() if logit_alpha is None else Logit(logit_alpha)]
    transform = Sequential(
        *preprocess, MultiScale(stages, tuple(shape), squeeze_first=squeeze_first, factor_out=factor_out)
    )
    return DensityModel(transform, tuple(shape), learned_prior=learned_prior)
