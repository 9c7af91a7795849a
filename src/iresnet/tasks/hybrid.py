r"""``task=hybrid``: one flow that models the images and classifies them (Nalisnick et al., ICML
2019), trained on :math:`\log p(y \mid x) + \lambda \log p(x) / D`; with ``labelled_fraction``
below 1, the unlabelled images count through :math:`\log p(x)` alone (semi-supervised). Its test
error and bits/dim come from one pass."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.lipschitz import converge_spectral_norms
from ..core.logdet import LogDetEstimator
from ..flows.density import DensityModel
from ..models.build import build_hybrid_model
from ..models.hybrid import HybridModel, hybrid_model
from .base import Task, estimators_set_to, eval_estimator
from .classify import ClassifierEvaluation, classification
from .density import Evaluation, summarize

if TYPE_CHECKING:
    from ..train.config import TrainConfig
    from ..train.sources import DataSource

__all__ = ["HybridEvaluation", "HybridTask", "evaluate_hybrid"]


@dataclass
class HybridEvaluation:
    """A hybrid model's test error and its density's NLL and bits/dim, from the same pass."""

    classifier: ClassifierEvaluation
    density: Evaluation

    def __str__(self) -> str:
        return f"{self.classifier}; {self.density}"

    def metrics(self) -> dict[str, float]:
        return {**self.classifier.metrics(), **self.density.metrics()}


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


class HybridTask(Task[HybridModel, HybridEvaluation]):
    r"""The hybrid model: cross-entropy of the labelled rows plus :math:`\lambda` (the setting
    ``hybrid_lambda``) times the NLL per dimension of all the step's images; with a labelled
    fraction below 1 (and :math:`\lambda > 0`), a batch of unlabelled images joins each labelled one."""

    name = "hybrid"
    title = "hybrid model"
    labelled = True
    generative = True
    settings = ("hybrid_lambda",)

    def builder(self, data: str) -> Callable[..., HybridModel]:
        return hybrid_model

    def build_model(self, data: str, options: dict[str, Any]) -> HybridModel:
        return build_hybrid_model(data, options)

    def flow(self, model: HybridModel) -> DensityModel:
        return model.density

    def batch(
        self, source: DataSource, step: int, config: TrainConfig, rank: int = 0, world: int = 1
    ) -> tuple[Tensor, Tensor | None]:
        """The labelled rows first, then (labels for a fraction only, :math:`\\lambda > 0`) the
        unlabelled batch."""
        x, y = super().batch(source, step, config, rank, world)
        if config.labelled_fraction < 1 and config.hybrid_lambda > 0:
            x = torch.cat([x, source.batch(step, config.batch_size, rank, world)])
        return x, y

    def objective(
        self, model: nn.Module, x: Tensor, y: Tensor | None, config: TrainConfig
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if y is None:
            raise ValueError("the hybrid model trains on labelled batches: got no labels")
        logits, log_prob = model(x)
        logits = logits[: len(y)]
        cross_entropy = nn.functional.cross_entropy(logits, y)
        nll = -log_prob.mean()
        loss = cross_entropy + config.hybrid_lambda * nll / x[0].numel()
        accuracy = (logits.argmax(1) == y).double().mean()
        return loss, {"cross_entropy": cross_entropy.detach(), "accuracy": accuracy, "nll": nll.detach()}

    def evaluate(
        self,
        model: HybridModel,
        source: DataSource,
        *,
        size: int | None = None,
        batch_size: int = 500,
        progress: bool = False,
        density: Evaluation | None = None,
        eval_logdet: str | dict[str, Any] | None = "auto",
    ) -> HybridEvaluation:
        data = source.image_data()
        images, labels = data.test[:size], data.test_labels[:size]
        estimator = eval_estimator(eval_logdet, discrete=True)
        result = evaluate_hybrid(model, images, labels, batch_size=batch_size, estimator=estimator)
        return result if density is None else HybridEvaluation(result.classifier, density)

    def report(self, evaluation: HybridEvaluation) -> tuple[dict[str, Any], str]:
        figures = {**dataclasses.asdict(evaluation.density), "classifier": dataclasses.asdict(evaluation.classifier)}
        return figures, f"{evaluation.classifier}\n{evaluation.density}"
