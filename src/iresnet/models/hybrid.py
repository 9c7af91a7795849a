r"""A hybrid model: one invertible network both models the density of the data and, through a
classifier on (part of) its latent, the labels (Nalisnick et al., "Hybrid Models with Deep
and Invertible Features", ICML 2019, https://arxiv.org/abs/1902.02767; the Residual Flows
paper's hybrid experiments). Trained on

.. math:: \log p(y \mid x) + \lambda \log p(x) / D,

it is a classifier at :math:`\lambda = 0` and learns from unlabelled images through
:math:`\log p(x)` (semi-supervised learning; Izmailov et al., "Semi-Supervised Learning with
Normalizing Flows", ICML 2020, https://arxiv.org/abs/1912.13025, for the class-conditional prior)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..flows.density import DensityModel
from ..flows.multiscale import MultiScale
from .image import image_flow

__all__ = ["HybridModel", "hybrid_model"]


class HybridModel(nn.Module):
    r"""A density model and a classifier on its latent :math:`z`.

    ``model(x)`` returns ``(logits, log p(x))`` from one pass through the flow, so that
    ``DistributedDataParallel(model)`` wraps the whole computation; ``model.density`` is the
    :class:`DensityModel` (sampling, likelihoods alone).

    The classifier is either a linear layer on the last ``features`` latent dimensions
    (Nalisnick et al.), or, where ``density`` has a class-conditional mixture prior, Bayes' rule on
    it: :math:`p(y = k \mid x) \propto N(z; \mu_k, I)` (Izmailov et al.'s FlowGMM), whose
    unlabelled term :math:`\log p(x)` pulls the latents of every image towards one class mean.
    """

    def __init__(self, density: DensityModel, classes: int, features: int | None = None) -> None:
        super().__init__()
        latent_size = math.prod(density.latent_shape)
        features = latent_size if features is None else features
        if not 0 < features <= latent_size:
            raise ValueError(f"features must lie in [1, {latent_size}] (the latent size), got {features}")
        if density.class_means is not None and len(density.class_means) != classes:
            raise ValueError(f"the prior has {len(density.class_means)} class means for {classes} classes")
        self.density = density
        self.features = features
        self.head = nn.Linear(features, classes) if density.class_means is None else None

    @property
    def event_size(self) -> int:
        return self.density.event_size

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, logdet = self.density.transform(x)
        if self.head is None:
            class_log_probs = self.density.class_log_probs(z)
            log_prior = torch.logsumexp(class_log_probs, 1) - math.log(class_log_probs.shape[1])
            return class_log_probs, log_prior + logdet
        return self.head(z.flatten(1)[:, -self.features :]), self.density.prior().log_prob(z) + logdet


def hybrid_model(
    shape: tuple[int, int, int], levels: int, classes: int, *, classifier: str = "linear", **flow_options: Any
) -> HybridModel:
    """:func:`~iresnet.models.image_flow` with ``flow_options`` and a classifier on its latent:
    ``classifier="linear"``, a linear layer on the output of its last scale (with
    ``factor_out``, the part of the latent not factored out earlier; without, all of it), or
    ``"gaussians"``, the class-conditional mixture prior with means drawn from
    :math:`N(0, I)` (fixed, saved with the model).

    Example:
        >>> model = hybrid_model((1, 8, 8), 17, 10, scales=2, blocks=1, hidden=8, squeeze_first=True)
        >>> logits, log_prob = model(torch.randint(0, 17, (3, 1, 8, 8)))
        >>> logits.shape, log_prob.shape
        (torch.Size([3, 10]), torch.Size([3]))
    """
    flow = image_flow(shape, levels, **flow_options)
    if classifier == "gaussians":
        if flow_options.get("learned_prior"):
            raise ValueError("the class-conditional prior has fixed means: learned_prior must be False")
        means = torch.randn(classes, *flow.latent_shape)
        return HybridModel(DensityModel(flow.transform, flow.event_shape, class_means=means), classes)
    if classifier != "linear":
        raise ValueError(f"classifier must be 'linear' or 'gaussians', got {classifier!r}")
    multiscale = next(m for m in flow.modules() if isinstance(m, MultiScale))
    return HybridModel(flow, classes, math.prod(multiscale.stage_shapes[-1]))
