"""Test negative log-likelihood with its standard error, the numbers users quote."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.attributes import attribute_set
from ..core.lipschitz import converge_spectral_norms
from ..core.logdet import LogDetEstimator, Roulette, make_estimator
from ..core.residual import ResidualBlock
from ..data.preprocess import bits_per_dim
from ..flows.density import DensityModel
from ..models.hybrid import HybridModel

__all__ = [
    "ClassifierEvaluation",
    "Evaluation",
    "HybridEvaluation",
    "accurate_estimator",
    "classification",
    "EVAL_SEED",
    "estimators_set_to",
    "eval_estimator",
    "evaluation_randomness",
    "evaluate",
    "evaluate_baselines",
    "evaluate_classifier",
    "evaluate_hybrid",
    "recalibrate_batch_norms",
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


EVAL_SEED = 7
"""The seed of every evaluation's dequantisation noise and probes (training's, ``iresnet eval``'s,
the OOD comparison's), so that the same weights always give the same figures."""


@contextlib.contextmanager
def evaluation_randomness(device: torch.device | str = "cpu") -> Iterator[None]:
    """Within the context the global generators (and ``device``'s, for CUDA) start from
    :data:`EVAL_SEED`; their states are restored after."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(EVAL_SEED)
        yield


def accurate_estimator() -> LogDetEstimator:
    """The evaluation estimator for images: the roulette with 20 exact terms, as the Residual
    Flows paper evaluates (unbiased, with a small variance), and 4 probes where it takes 1."""
    return Roulette(n_exact_terms=20, n_probes=4)


def eval_estimator(setting: str | dict[str, Any] | None, discrete: bool) -> LogDetEstimator | None:
    """The estimator of a run's test evaluations from its ``eval_logdet`` setting (see
    :class:`~iresnet.train.TrainConfig`): for ``"auto"``, :func:`accurate_estimator` on
    ``discrete`` data (images) and ``None`` (the model's own) on 2-D data; ``None`` for
    ``None``; else the estimator the setting names."""
    if setting == "auto":
        return accurate_estimator() if discrete else None
    return make_estimator(setting, "eval_logdet")


def estimators_set_to(model: nn.Module, estimator: LogDetEstimator | None) -> contextlib.AbstractContextManager[None]:
    """Within the context every residual block of ``model`` uses ``estimator`` (if not None)."""
    if estimator is None:
        return contextlib.nullcontext()
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock) and m.logdet is not None]
    return attribute_set(blocks, "logdet", estimator)


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
    gaussian = FullCovarianceGaussian().fit(train, generator)
    return {
        "independent pixels": summarize(pixels.log_prob(test), event_size, True),
        "full-covariance Gaussian": summarize(gaussian.log_prob(test, generator), event_size, True),
    }


@dataclass
class ClassifierEvaluation:
    """Test error in percent (the papers' form) with its binomial standard error, and the mean
    cross-entropy in nats."""

    n: int
    error_percent: float
    error_percent_se: float
    nll: float

    @property
    def accuracy(self) -> float:
        return 1 - self.error_percent / 100

    def __str__(self) -> str:
        return (
            f"test error {self.error_percent:.2f} +- {self.error_percent_se:.2f} %, "
            f"cross-entropy {self.nll:.4f} nats ({self.n} examples)"
        )


@torch.no_grad()
def recalibrate_batch_norms(model: nn.Module, images: Tensor, batch_size: int = 500, limit: int = 10_000) -> None:
    """Replace the running statistics of every BatchNorm layer of ``model`` by their averages
    over the first ``limit`` of ``images`` (in batches) under the current weights, the rest of
    the model in eval mode
    ("precise BatchNorm": Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021,
    https://arxiv.org/abs/2105.07576). Running averages taken during training lag the weights;
    where features have a large mean and a small spread, as behind an i-ResNet trunk with a small
    coefficient, that lag alone can move test error by tens of points."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    model.eval()
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
        norm.train()
    device = next(model.parameters()).device
    try:
        for x in images[:limit].split(batch_size):
            model(x.to(device))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
            norm.eval()


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500, *, calibration: Tensor | None = None
) -> ClassifierEvaluation:
    """Error and cross-entropy of ``model`` on ``images`` in eval mode, spectral norms converged,
    then (``calibration``: training images) its BatchNorm statistics recomputed on them."""
    model.eval()
    converge_spectral_norms(model)
    if calibration is not None:
        recalibrate_batch_norms(model, calibration)  # batches of 500, whatever batch_size: the same statistics
    device = next(model.parameters()).device
    logits = torch.cat([model(x.to(device)).double().cpu() for x in images.split(batch_size)])
    return classification(logits, labels)


def classification(logits: Tensor, labels: Tensor) -> ClassifierEvaluation:
    """Error (with its binomial standard error) and mean cross-entropy of ``logits``."""
    if not torch.isfinite(logits).all():
        raise FloatingPointError("the classifier's test logits are not all finite")
    wrong = (logits.argmax(1) != labels).double()
    n = len(labels)
    error = wrong.mean().item()
    nll = torch.nn.functional.cross_entropy(logits.double(), labels).item()
    return ClassifierEvaluation(n, 100 * error, 100 * math.sqrt(error * (1 - error) / n), nll)


@dataclass
class HybridEvaluation:
    """A hybrid model's test error and its density's NLL and bits/dim, from the same pass."""

    classifier: ClassifierEvaluation
    density: Evaluation

    def __str__(self) -> str:
        return f"{self.classifier}; {self.density}"


@torch.no_grad()
def evaluate_hybrid(
    model: HybridModel,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 500,
    estimator: LogDetEstimator | None = None,
) -> HybridEvaluation:
    """Test error and bits/dim of a hybrid model in eval mode, spectral norms converged, with
    ``estimator`` for the log-determinants (``None``: the blocks' own)."""
    model.eval()
    converge_spectral_norms(model)
    device = next(model.parameters()).device
    logits, log_probs = [], []
    with estimators_set_to(model, estimator):
        for x in images.split(batch_size):
            batch_logits, batch_log_probs = model(x.to(device))
            logits.append(batch_logits.double().cpu())
            log_probs.append(batch_log_probs.double().cpu())
    density = summarize(torch.cat(log_probs), model.event_size, discrete=True)
    return HybridEvaluation(classification(torch.cat(logits), labels), density)
