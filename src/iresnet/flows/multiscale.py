r"""The multi-scale architecture: invertible stages with a squeeze between them and, at each
squeeze, half the channels factored out to the latent (Dinh et al., "Density estimation using
Real NVP", ICLR 2017, https://arxiv.org/abs/1605.08803)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from ..core.invertible import Invertible, InvertibleLayer, sum_logdets
from ..core.layers import Squeeze
from ..core.validation import check_input

__all__ = ["MultiScale"]


class MultiScale(InvertibleLayer):
    r"""``stages[0]``, squeeze, factor out half, ``stages[1]``, ..., ``stages[-1]``; returns the
    factored-out parts and the last output flattened and concatenated, ``(batch, D)``, with the
    stages' log-dets summed (:func:`~iresnet.core.invertible.sum_logdets`: ``None`` if any stage
    gives ``None``; squeezes and splits have log-det 0).

    Arguments:
        stages: invertible modules, one per scale, each keeping its input's shape.
        event_shape: the ``(C, H, W)`` of one input; an input of another shape, or a latent of
            another size than :math:`CHW`, raises ``ValueError``.
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
        self, stages: Sequence[nn.Module], event_shape: tuple[int, int, int], *, squeeze_first: bool, factor_out: bool
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.squeeze = Squeeze()
        self.squeeze_first = squeeze_first
        self.factor_out = factor_out
        channels, height, width = event_shape
        self.event_shape = (channels, height, width)
        self.stage_shapes = _stage_shapes(self.event_shape, len(stages), squeeze_first, factor_out)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        check_input(x, "MultiScale input", self.event_shape, None, finite=False)  # its stages check the values
        if self.squeeze_first:
            x, _ = self.squeeze(x)
        parts, logdets = [], []
        for i, stage in enumerate(self.stages):
            x, logdet = stage(x)
            logdets.append(logdet)
            if i < len(self.stages) - 1:
                x, _ = self.squeeze(x)
                if self.factor_out:
                    keep = x.shape[1] // 2
                    parts.append(x[:, keep:].flatten(1))
                    x = x[:, :keep]
        parts.append(x.flatten(1))
        return torch.cat(parts, 1), sum_logdets(logdets, x)

    def inverse(self, z: Tensor) -> Tensor:
        check_input(z, "MultiScale.inverse input", (math.prod(self.event_shape),), None, finite=False)
        factored_shapes = self.stage_shapes[1:] if self.factor_out else []
        sizes = [math.prod(s) for s in factored_shapes] + [math.prod(self.stage_shapes[-1])]
        parts = list(z.split(sizes, 1))
        x = parts.pop().reshape(-1, *self.stage_shapes[-1])
        for i in reversed(range(len(self.stages))):
            if i < len(self.stages) - 1:
                if self.factor_out:
                    x = torch.cat([x, parts.pop().reshape(-1, *self.stage_shapes[i + 1])], 1)
                x = self.squeeze.inverse(x)
            x = cast(Invertible, self.stages[i]).inverse(x)
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
