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

__all__ = [
    "DensityTask",
    "Evaluation",
    "ImportanceWeighted",
    "dequantisation_log_probs",
    "evaluate",
    "evaluate_baselines",
    "evaluate_importance_weighted",
    "importance_weighted",
    "summarize",
]


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
    log_probs = dequantisation_log_probs(model, data, 1, batch_size=batch_size, estimator=estimator, progress=progress)
    return summarize(log_probs.squeeze(1), model.event_size, discrete)


@dataclass
class ImportanceWeighted(Evaluation):
    """An :class:`Evaluation` of the importance-weighted log-likelihood over ``k`` dequantisation
    samples per image (:func:`evaluate_importance_weighted`)."""

    k: int = 1

    def __str__(self) -> str:
        return f"importance-weighted (K={self.k}) {super().__str__()}"

    def metrics(self) -> dict[str, float]:
        return {"k": self.k, **super().metrics()}


@torch.no_grad()
def dequantisation_log_probs(
    model: DensityModel,
    data: Tensor,
    k: int,
    *,
    batch_size: int = 500,
    estimator: LogDetEstimator | None = None,
    progress: bool = False,
) -> Tensor:
    r"""``(n, k)`` float64: :math:`\log p(x + u_j)` for ``k`` fresh dequantisation draws
    :math:`u_j` of each of the ``n`` integer images ``data`` (the model starts with a
    dequantiser; for other data, ``k`` evaluations of :math:`\log p(x)`), in eval mode with spectral norms converged, as
    :func:`evaluate` scores them. The ``k`` copies of an image go through the model together,
    about ``batch_size`` rows at a time; with ``k = 1`` the batches and draws are
    :func:`evaluate`'s."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    model.eval()
    converge_spectral_norms(model)
    device = next(iter(model.parameters()), next(iter(model.buffers()), data)).device
    batches = data.split(max(1, batch_size // k))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluating" if k == 1 else f"evaluating, K={k}", unit="batch", leave=False)
    rows = []
    with estimators_set_to(model, estimator):
        for x in batches:
            copies = x.to(device).repeat_interleave(k, dim=0)  # image i's draws are rows i*k ... i*k + k - 1
            log_probs = torch.cat([model(chunk).double().cpu() for chunk in copies.split(batch_size)])
            rows.append(log_probs.view(len(x), k))
    return torch.cat(rows) if rows else torch.empty(0, k, dtype=torch.float64)


def importance_weighted(log_probs: Tensor) -> Tensor:
    r"""Per image, :math:`\log \frac{1}{K} \sum_k p(x + u_k)
    = \operatorname{logsumexp}_k \log p(x + u_k) - \log K` from the ``(n, K)`` log-likelihoods
    of :func:`dequantisation_log_probs`: never below their mean (Jensen), equal to it for
    :math:`K = 1`."""
    return torch.logsumexp(log_probs.double(), dim=1) - math.log(log_probs.shape[1])


def evaluate_importance_weighted(
    model: DensityModel,
    data: Tensor,
    k: int,
    *,
    batch_size: int = 500,
    estimator: LogDetEstimator | None = None,
    progress: bool = False,
) -> ImportanceWeighted:
    r"""The importance-weighted NLL and bits/dim of the integer images ``data`` over ``k``
    dequantisation samples per image (Burda et al., "Importance Weighted Autoencoders", ICLR
    2016, https://arxiv.org/abs/1509.00519; reported so by Ho et al., Flow++, ICML 2019):

    .. math:: \log P(x) \ge \mathbb{E}\Big[\log \frac{1}{K} \sum_{k=1}^K p(x + u_k)\Big]
              \ge \mathbb{E}[\log p(x + u)],

    the bound tightening as :math:`K` grows, to :math:`\log P(x)` as :math:`K \to \infty`;
    each image's estimate is :func:`importance_weighted` of its ``k`` log-likelihoods, and the
    mean and standard error are over images. The single-sample figure the papers report is
    :func:`evaluate`'s. The log-det inside :math:`\log p` is ``estimator``'s (``None``: the
    blocks' own): stochastic with the roulette, so the figure is a bound only up to that
    estimator's noise; with the exact log-det it is a true bound."""
    log_probs = dequantisation_log_probs(model, data, k, batch_size=batch_size, estimator=estimator, progress=progress)
    summary = summarize(importance_weighted(log_probs), model.event_size, discrete=True)
    return ImportanceWeighted(**vars(summary), k=k)


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
