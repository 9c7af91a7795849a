r"""A hybrid model: one invertible network both models the density of the data and, through a
linear classifier on (part of) its latent, the labels (Nalisnick et al., "Hybrid Models with Deep
and Invertible Features", ICML 2019, https://arxiv.org/abs/1902.02767; the Residual Flows
paper's hybrid experiments). Trained on

.. math:: \log p(y \mid x) + \lambda \log p(x) / D,

it is a classifier at :math:`\lambda = 0` and learns from unlabelled images through
:math:`\log p(x)` (semi-supervised learning)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from .density import DensityModel
from .image import MultiScale, image_flow

__all__ = ["HybridModel", "hybrid_model"]


class HybridModel(nn.Module):
    """A density model and a linear classifier on the last ``features`` latent dimensions.

    ``model(x)`` returns ``(logits, log p(x))`` from one pass through the flow, so that
    ``DistributedDataParallel(model)`` wraps the whole computation; ``model.density`` is the
    :class:`DensityModel` (sampling, likelihoods alone).
    """

    def __init__(self, density: DensityModel, classes: int, features: int | None = None) -> None:
        super().__init__()
        latent_size = math.prod(density.latent_shape)
        features = latent_size if features is None else features
        if not 0 < features <= latent_size:
            raise ValueError(f"features must lie in [1, {latent_size}] (the latent size), got {features}")
        self.density = density
        self.features = features
        self.head = nn.Linear(features, classes)

    @property
    def event_size(self) -> int:
        return self.density.event_size

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, logdet = self.density.transform(x)
        log_prob = self.density.prior().log_prob(z) + logdet
        return self.head(z.flatten(1)[:, -self.features :]), log_prob


def hybrid_model(shape: tuple[int, int, int], levels: int, classes: int, **flow_options: Any) -> HybridModel:
    """:func:`~iresnet.models.image_flow` with ``flow_options``, and a linear classifier on the
    output of its last scale (with ``factor_out``, the part of the latent not factored out
    earlier; without, all of it).

    Example:
        >>> model = hybrid_model((1, 8, 8), 17, 10, scales=2, blocks=1, hidden=8, squeeze_first=True)
        >>> logits, log_prob = model(torch.randint(0, 17, (3, 1, 8, 8)))
        >>> logits.shape, log_prob.shape
        (torch.Size([3, 10]), torch.Size([3]))
    """
    density = image_flow(shape, levels, **flow_options)
    multiscale = next(m for m in density.modules() if isinstance(m, MultiScale))
    return HybridModel(density, classes, math.prod(multiscale.stage_shapes[-1]))
