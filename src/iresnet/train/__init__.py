"""Training and run directories; the evaluations of the tasks (:mod:`iresnet.tasks`), as they
were named here before."""

from ..tasks import (
    ClassifierEvaluation,
    Evaluation,
    HybridEvaluation,
    accurate_estimator,
    evaluate,
    evaluate_baselines,
    evaluate_classifier,
    evaluate_hybrid,
)
from .checkpoint import RunDirectoryError, RunFiles, RunInUseError, load_run
from .config import TrainConfig, parse_override, resolve_config
from .engine import FinishedRun, StoppedAtOnce, TrainingError, TrainResult, train
from .sources import make_source

__all__ = [
    "ClassifierEvaluation",
    "Evaluation",
    "FinishedRun",
    "HybridEvaluation",
    "RunFiles",
    "RunDirectoryError",
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
