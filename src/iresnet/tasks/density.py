"""``task=density``: a density model of the data (the toy flow for 2-D data, the multi-scale
image flow for images), trained by maximum likelihood; its test negative log-likelihood, and
bits/dim for images, with standard errors: the numbers users quote."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.lipschitz import converge_spectral_norms
from ..core.logdet import LogDetEstimator
from ..data.images import image_spec
from ..data.preprocess import bits_per_dim
from ..flows.density import DensityModel
from ..models.build import build_density_model
from ..models.image import image_flow
from ..models.toy import toy_flow
from .base import Task, estimators_set_to, eval_estimator

if TYPE_CHECKING:
    from ..train.config import TrainConfig
    from ..train.sources import DataSource

__all__ = ["DensityTask", "Evaluation", "evaluate", "evaluate_baselines", "summarize"]


@dataclass
class Evaluation:
    """Mean NLL in nats per example and, for discrete images, bits/dim, each with its
    standard error (the standard deviation over examples divided by :math:`\\sqrt{n}`)."""

    n: int
    nll: float
    nll_se: float
    bits_per_dim: float | None = None
    bits_per_dim_se: float | None = None

    def __str__(self) -> str:
        text = f"test NLL {self.nll:.4f} +- {self.nll_se:.4f} nats"
        if self.bits_per_dim is not None:
            text += f", {self.bits_per_dim:.4f} +- {self.bits_per_dim_se:.4f} bits/dim"
        return f"{text} ({self.n} examples)"

    def metrics(self) -> dict[str, float]:
        figures = {"nll": self.nll, "nll_se": self.nll_se}
        if self.bits_per_dim is not None:
            figures["bits_per_dim"] = self.bits_per_dim
            if self.bits_per_dim_se is not None:  # set with bits_per_dim by summarize
                figures["bits_per_dim_se"] = self.bits_per_dim_se
        return figures


@torch.no_grad()
def evaluate(
    model: DensityModel,
    data: Tensor,
    *,
    discrete: bool,
    batch_size: int = 500,
    estimator: LogDetEstimator | None = None,
    progress: bool = False,
) -> Evaluation:
    """The NLL of ``data`` under ``model`` in eval mode, spectral norms converged first;
    ``estimator`` replaces the blocks' log-det estimators for the evaluation (``None``: keep
    theirs). ``discrete`` data (integer images) also gets bits/dim."""
    model.eval()
    converge_spectral_norms(model)
    device = next(model.parameters()).device
    batches = data.split(batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluating", unit="batch", leave=False)
    with estimators_set_to(model, estimator):
        log_probs = torch.cat([model(x.to(device)).double().cpu() for x in batches])
    return summarize(log_probs, model.event_size, discrete)


def summarize(log_probs: Tensor, event_size: int, discrete: bool) -> Evaluation:
    """Mean NLL and (``discrete``) bits/dim of per-example log-likelihoods, with standard errors."""
    if not torch.isfinite(log_probs).all():
        raise FloatingPointError(f"{int((~torch.isfinite(log_probs)).sum())} test log-likelihoods are not finite")
    log_probs = log_probs.double().cpu()
    nll = -log_probs
    se = nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else math.nan
    result = Evaluation(len(nll), nll.mean().item(), se)
    if discrete:
        bpd = bits_per_dim(log_probs, event_size)
        result.bits_per_dim = bpd.mean().item()
        result.bits_per_dim_se = bpd.std().item() / math.sqrt(len(bpd)) if len(bpd) > 1 else math.nan
    return result


def evaluate_baselines(train: Tensor, test: Tensor, levels: int, seed: int = 0) -> dict[str, Evaluation]:
    """Two baselines for integer images, fitted on ``train`` and scored on ``test`` the way a
    flow is (log-density of the dequantised image): independent pixels (a smoothed histogram
    per pixel) and a full-covariance Gaussian."""
    from ..models.baselines import FullCovarianceGaussian, IndependentPixels

    generator = torch.Generator().manual_seed(seed)
    event_size = test[0].numel()
    pixels = IndependentPixels(levels).fit(train)
    gaussian = FullCovarianceGaussian().fit(train)
    return {
        "independent pixels": summarize(pixels.log_prob(test), event_size, True),
        "full-covariance Gaussian": summarize(gaussian.log_prob(test, generator), event_size, True),
    }


class DensityTask(Task[DensityModel, Evaluation]):
    """A density model: minus the mean log-likelihood as the loss; test NLL (and bits/dim), with
    the exact log-determinant for 2-D data and :func:`~iresnet.tasks.accurate_estimator` for
    images."""

    name = "density"
    title = "density model"
    generative = True
    report_card = True

    def builder(self, data: str) -> Callable[..., DensityModel]:
        return toy_flow if image_spec(data) is None else image_flow

    def build_model(self, data: str, options: dict[str, Any]) -> DensityModel:
        return build_density_model(data, options)

    def flow(self, model: DensityModel) -> DensityModel:
        return model

    def objective(
        self, model: nn.Module, x: Tensor, y: Tensor | None, config: TrainConfig
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss = -model(x).mean()
        return loss, {"nll": loss.detach()}

    def evaluate(
        self,
        model: DensityModel,
        source: DataSource,
        *,
        size: int | None = None,
        batch_size: int = 500,
        progress: bool = False,
        density: Evaluation | None = None,
        eval_logdet: str | dict[str, Any] | None = "auto",
    ) -> Evaluation:
        if density is not None:
            return density
        estimator = eval_estimator(eval_logdet, source.is_image)
        test = source.test[:size]
        return evaluate(
            model, test, discrete=source.is_image, batch_size=batch_size, estimator=estimator, progress=progress
        )
