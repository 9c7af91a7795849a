"""The evaluations, now the tasks' (:mod:`iresnet.tasks`), under the names they had here."""

from ..tasks import (
    EVAL_SEED,
    ClassifierEvaluation,
    Evaluation,
    HybridEvaluation,
    accurate_estimator,
    estimators_set_to,
    evaluate,
    evaluate_baselines,
    evaluate_classifier,
    evaluate_hybrid,
    evaluation_randomness,
    recalibrate_batch_norms,
    summarize,
)
from ..tasks.classify import classification

__all__ = [
    "ClassifierEvaluation",
    "Evaluation",
    "HybridEvaluation",
    "accurate_estimator",
    "classification",
    "EVAL_SEED",
    "estimators_set_to",
    "evaluation_randomness",
    "evaluate",
    "evaluate_baselines",
    "evaluate_classifier",
    "evaluate_hybrid",
    "recalibrate_batch_norms",
    "summarize",
]
