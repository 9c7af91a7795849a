"""Training, evaluation and run directories."""

from .checkpoint import RunFiles, load_run
from .config import TrainConfig, parse_override, resolve_config
from .engine import TrainingError, TrainResult, train
from .evaluate import Evaluation, accurate_estimator, evaluate, evaluate_baselines
from .sources import make_source

__all__ = [
    "Evaluation",
    "RunFiles",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "accurate_estimator",
    "evaluate",
    "evaluate_baselines",
    "load_run",
    "make_source",
    "parse_override",
    "resolve_config",
    "train",
]
