"""Inverting a trained classifier's trunk from its final features back to the input: the
reconstruction error, the cost of the fixed-point and Anderson inversions per block, and each
block's certified Lipschitz bound (Behrmann et al., 2019, section 5)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core.certificates import lipschitz_bound
from ..core.inverse import InversionError
from ..core.lipschitz import converge_spectral_norms
from ..core.residual import ResidualBlock
from ..models.classifier import Classifier

__all__ = ["BlockReport", "Reconstruction", "reconstruct"]


@dataclass
class BlockReport:
    """One residual block: its certified :math:`\\mathrm{Lip}(g)` and the iterations each
    inversion method needed (``None`` where it failed)."""

    bound: float
    iterations: dict[str, int | None] = field(default_factory=dict)


@dataclass
class Reconstruction:
    """Inputs recovered from features (``None`` if an inversion failed, with ``failure`` saying
    where), their max and mean absolute error, and a report per block."""

    images: Tensor | None
    max_error: float | None
    mean_error: float | None
    blocks: list[BlockReport]
    failure: str | None = None


@torch.no_grad()
def reconstruct(
    model: Classifier, images: Tensor, methods: tuple[str, ...] = ("fixed_point", "anderson")
) -> Reconstruction:
    """Features of ``images`` inverted back by each method in ``methods`` (in eval mode, spectral
    norms converged); the reconstruction and its errors come from the first method."""
    model.eval()
    converge_spectral_norms(model)
    blocks = [m for m in model.trunk if isinstance(m, ResidualBlock)]
    features = model.features(images)
    reports = [BlockReport(lipschitz_bound(b.g, b.event_shape)) for b in blocks]
    recovered, failure = None, None
    for method in methods:
        for block in blocks:
            block.last_inversion = None
        try:
            result = _invert_trunk(model, features, method)
        except InversionError as error:
            failure = failure or f"{method}: {error}"
            result = None
        for report, block in zip(reports, blocks):
            report.iterations[method] = None if block.last_inversion is None else block.last_inversion.iterations
        if method == methods[0]:
            recovered = result
    if recovered is None:
        return Reconstruction(None, None, None, reports, failure)
    error = (recovered - images.to(recovered)).abs()
    return Reconstruction(recovered, error.max().item(), error.mean().item(), reports, failure)


def _invert_trunk(model: Classifier, features: Tensor, method: str) -> Tensor:
    """:meth:`Classifier.reconstruct` with every residual block inverted by ``method``."""
    x = features
    for layer in reversed(model.trunk):
        x = layer.inverse(x, method=method) if isinstance(layer, ResidualBlock) else layer.inverse(x)
    return x
