"""``task=classify``: the i-ResNet classifier of labelled images (Behrmann et al., 2019), trained
on the cross-entropy; its test error in percent with the binomial standard error, BatchNorm
statistics recomputed on the training images first."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.lipschitz import converge_spectral_norms
from ..models.build import build_classifier
from ..models.classifier import Classifier, iresnet_classifier
from .base import Task

if TYPE_CHECKING:
    from ..train.config import TrainConfig
    from ..train.sources import DataSource
    from .density import Evaluation

__all__ = [
    "ClassifierEvaluation",
    "ClassifyTask",
    "classification",
    "evaluate_classifier",
    "recalibrate_batch_norms",
]


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

    def metrics(self) -> dict[str, float]:
        return {
            "cross_entropy": self.nll,
            "accuracy": self.accuracy,
            "error_percent": self.error_percent,
            "error_percent_se": self.error_percent_se,
        }


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


class ClassifyTask(Task[Classifier, ClassifierEvaluation]):
    """The classifier: cross-entropy of the labelled images as the loss; its weights are saved
    with BatchNorm statistics recomputed on the training images, as evaluation uses them."""

    name = "classify"
    title = "classifier"
    labelled = True

    def builder(self, data: str) -> Callable[..., Classifier]:
        return iresnet_classifier

    def build_model(self, data: str, options: dict[str, Any]) -> Classifier:
        return build_classifier(data, options)

    def objective(
        self, model: nn.Module, x: Tensor, y: Tensor | None, config: TrainConfig
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if y is None:
            raise ValueError("the classifier trains on labelled batches: got no labels")
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        return loss, {"cross_entropy": loss.detach(), "accuracy": (logits.argmax(1) == y).double().mean()}

    def evaluate(
        self,
        model: Classifier,
        source: DataSource,
        *,
        size: int | None = None,
        batch_size: int = 500,
        progress: bool = False,
        density: Evaluation | None = None,
        eval_logdet: str | dict[str, Any] | None = "auto",
    ) -> ClassifierEvaluation:
        data = source.image_data()
        images, labels = data.test[:size], data.test_labels[:size]
        return evaluate_classifier(model, images, labels, batch_size, calibration=data.train)

    def calibrate(self, model: Classifier, source: DataSource) -> None:
        recalibrate_batch_norms(model, source.image_data().train)
