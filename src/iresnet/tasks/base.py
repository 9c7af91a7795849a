"""What every task gives a run (:class:`Task`), and the randomness and estimator that every
evaluation shares, so that the same weights always give the same figures."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import torch
from torch import Tensor, nn

from ..core.attributes import attribute_set
from ..core.logdet import LogDetEstimator, Roulette, make_estimator
from ..core.residual import ResidualBlock

if TYPE_CHECKING:
    from ..flows.density import DensityModel
    from ..train.config import TrainConfig
    from ..train.sources import DataSource
    from .density import Evaluation

__all__ = [
    "EVAL_SEED",
    "Evaluated",
    "Task",
    "accurate_estimator",
    "eval_estimator",
    "estimators_set_to",
    "evaluation_randomness",
    "listed",
]


class Evaluated(Protocol):
    """What a task's evaluation gives: a dataclass, with one line of text (``str``) and its test record."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def metrics(self) -> dict[str, float]:
        """The figures of the test record in ``metrics.jsonl``."""
        ...


_Model = TypeVar("_Model", bound=nn.Module)
_Evaluation = TypeVar("_Evaluation", bound=Evaluated)


class Task(Generic[_Model, _Evaluation]):
    """One kind of run: what it builds, trains on, optimises, reports and draws.

    A task is stateless; the run's settings and data come with each call. Subclasses set the
    class attributes and implement :meth:`builder`, :meth:`build_model`, :meth:`objective` and
    :meth:`evaluate`; the rest have defaults. The type parameters are the model the task builds
    and its evaluation (the model that :meth:`objective` gets may be wrapped for training, by
    ``DistributedDataParallel`` or ``torch.compile``). :data:`iresnet.tasks.TASKS` registers one instance
    of each by its :attr:`name`, the setting ``task`` of :class:`~iresnet.train.TrainConfig`.
    """

    name: ClassVar[str]
    """The value of the setting ``task``."""
    title: ClassVar[str]
    """What the task trains, for messages: "density model", ..."""
    labelled: ClassVar[bool] = False
    """Whether it trains on labels: it needs labelled images and takes ``labelled_fraction``."""
    generative: ClassVar[bool] = False
    """Whether its model holds a flow (:meth:`flow`) to sample, draw and score other data with."""
    report_card: ClassVar[bool] = False
    """Whether ``iresnet eval`` gives its runs the report card of :mod:`iresnet.report.card`."""
    settings: ClassVar[tuple[str, ...]] = ()
    """The settings of :class:`~iresnet.train.TrainConfig` that this task alone takes."""

    def __repr__(self) -> str:
        return f"<task {self.name!r}>"

    # -- the model --------------------------------------------------------------------------------
    def builder(self, data: str) -> Callable[..., _Model]:
        """The model builder for the data set ``data``, whose keyword options ``model.KEY`` sets."""
        raise NotImplementedError

    def build_model(self, data: str, options: dict[str, Any]) -> _Model:
        """The model for the data set ``data``, with the builder's ``options``."""
        raise NotImplementedError

    def flow(self, model: _Model) -> DensityModel | None:
        """The density model within ``model`` (``None`` where it has none)."""
        return None

    # -- training ---------------------------------------------------------------------------------
    def check(self, source: DataSource, config: TrainConfig) -> None:
        """Refuse, with ``ValueError``, data that the task cannot train on."""
        if not self.labelled:
            return
        if not source.is_image:
            raise ValueError(f"task {self.name!r} needs labelled image data, and {source.name!r} has no labels")
        labelled = source.image_data().labelled
        if len(labelled) < config.batch_size:
            raise ValueError(
                f"labelled_fraction {config.labelled_fraction} keeps {len(labelled)} labelled images, "
                f"fewer than a batch of {config.batch_size}: raise the fraction or lower batch_size"
            )

    def batch(
        self, source: DataSource, step: int, config: TrainConfig, rank: int = 0, world: int = 1
    ) -> tuple[Tensor, Tensor | None]:
        """The inputs of training step ``step`` (this process's share) and their labels
        (``None`` for a task without labels)."""
        if self.labelled:
            return source.image_data().labelled_batch(step, config.batch_size, rank, world)
        return source.batch(step, config.batch_size, rank, world), None

    def objective(
        self, model: nn.Module, x: Tensor, y: Tensor | None, config: TrainConfig
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one batch, and the values to log (``nll`` in nats per example, where the
        task has one: the train record adds bits/dim for images)."""
        raise NotImplementedError

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(
        self,
        model: _Model,
        source: DataSource,
        *,
        size: int | None = None,
        batch_size: int = 500,
        progress: bool = False,
        density: Evaluation | None = None,
        eval_logdet: str | dict[str, Any] | None = "auto",
    ) -> _Evaluation:
        """The trained ``model`` on the first ``size`` test examples of ``source`` (all of them
        with ``None``), in eval mode with spectral norms converged, its log-dets estimated as the
        setting ``eval_logdet`` says (:func:`eval_estimator`). ``density``, an evaluation of
        :meth:`flow` made elsewhere (the OOD comparison's), takes the place of its own."""
        raise NotImplementedError

    def calibrate(self, model: _Model, source: DataSource) -> None:
        """Whatever the evaluation weights need once training is over (before they are saved)."""

    def report(self, evaluation: _Evaluation) -> tuple[dict[str, Any], str]:
        """``iresnet eval``'s figures: the JSON report's and the text's."""
        return dataclasses.asdict(evaluation), str(evaluation)


def listed(words: list[str], last: str = "and") -> str:
    """``"a, b and c"``: ``words`` in a sentence.

    >>> listed(["'a'", "'b'", "'c'"], "or")
    "'a', 'b' or 'c'"
    """
    return f"{', '.join(words[:-1])} {last} {words[-1]}" if len(words) > 1 else "".join(words)


EVAL_SEED = 7
"""The seed of every evaluation's dequantisation noise and probes (training's, ``iresnet eval``'s,
the OOD comparison's), so that the same weights always give the same figures."""


@contextlib.contextmanager
def evaluation_randomness(device: torch.device | str = "cpu", seed: int = EVAL_SEED) -> Iterator[None]:
    """Within the context the global generators (and ``device``'s, for CUDA) start from ``seed``
    (:data:`EVAL_SEED` unless another evaluation seed is asked for); their states are restored after."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
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
