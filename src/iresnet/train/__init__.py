"""Training, evaluation and run directories."""

from .checkpoint import RunFiles, RunInUseError, load_run
from .config import TrainConfig, parse_override, resolve_config
from .engine import StoppedAtOnce, TrainingError, TrainResult, train
from .evaluate import (
    ClassifierEvaluation,
    Evaluation,
    HybridEvaluation,
    accurate_estimator,
    evaluate,
    evaluate_baselines,
    evaluate_classifier,
    evaluate_hybrid,
)
from .sources import make_source

__all__ = [
    "ClassifierEvaluation",
    "Evaluation",
    "HybridEvaluation",
    "RunFiles",
    "RunInUseError",
    "StoppedAtOnce",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "accurate_estimator",
    "evaluate",
    "evaluate_baselines",
    "evaluate_classifier",
    "evaluate_hybrid",
    "load_run",
    "make_source",
    "parse_override",
    "resolve_config",
    "train",
]
