"""The tasks a run can train, one file each behind one interface, :class:`Task`: the model it
builds, what a training batch is, the objective, the evaluation and its figures, and the flow that
is sampled and drawn. ``density`` (:mod:`.density`), ``classify`` (:mod:`.classify`) and
``hybrid`` (:mod:`.hybrid`).

A new task is a new file with a :class:`Task` subclass, and its line in :data:`TASKS`.

>>> get_task("hybrid").labelled, get_task("density").generative
(True, True)
"""

from typing import Any

from .base import (
    EVAL_SEED,
    Evaluated,
    Task,
    accurate_estimator,
    estimators_set_to,
    eval_estimator,
    evaluation_randomness,
    listed,
)
from .classify import ClassifierEvaluation, ClassifyTask, evaluate_classifier, recalibrate_batch_norms
from .density import (
    DensityTask,
    Evaluation,
    ImportanceWeighted,
    dequantisation_log_probs,
    evaluate,
    evaluate_baselines,
    evaluate_importance_weighted,
    importance_weighted,
    summarize,
)
from .hybrid import HybridEvaluation, HybridTask, evaluate_hybrid

__all__ = [
    "EVAL_SEED",
    "TASKS",
    "ClassifierEvaluation",
    "ClassifyTask",
    "DensityTask",
    "Evaluated",
    "Evaluation",
    "HybridEvaluation",
    "HybridTask",
    "ImportanceWeighted",
    "Task",
    "accurate_estimator",
    "dequantisation_log_probs",
    "eval_estimator",
    "estimators_set_to",
    "evaluate",
    "evaluate_baselines",
    "evaluate_classifier",
    "evaluate_hybrid",
    "evaluate_importance_weighted",
    "evaluation_randomness",
    "get_task",
    "importance_weighted",
    "recalibrate_batch_norms",
    "summarize",
]

TASKS: dict[str, Task[Any, Any]] = {task.name: task for task in (DensityTask(), ClassifyTask(), HybridTask())}
"""Every task, by the name the setting ``task`` gives."""


def get_task(name: str) -> Task[Any, Any]:
    """The task called ``name``: the one place where a task's name is looked up; ``ValueError``
    listing the tasks for any other name."""
    task = TASKS.get(name) if isinstance(name, str) else None
    if task is None:
        raise ValueError(f"task must be {listed([repr(known) for known in TASKS], 'or')}, got {name!r}")
    return task
