r"""The options of the model builders, typed and checked: one frozen dataclass per builder.

A builder's keyword arguments (``toy_flow(2, blocks=2, hidden=16)``) and a run's ``model``
settings (``model.hidden=16``) both become one of these objects, through :meth:`~BranchOptions.from_dict`:
one path that refuses an unknown option (naming the builder's options) and a bad value (naming
the option, the value and what it may be) before anything is built. Each concept has one default:
the coefficient :data:`~iresnet.core.lipschitz.DEFAULT_COEFF`, the power iterations
:data:`~iresnet.core.lipschitz.DEFAULT_POWER_ITERATIONS`, the inverse's cap
:data:`~iresnet.core.inverse.MAX_ITER`; the rest are defined here, once.

- :class:`BranchOptions`: what every residual block shares, its branch (``coeff``, ``lipschitz``,
  ``activation``, ``power_iterations``) and its inverse (``inverse_method``, ``atol``, ``rtol``, ``max_iter``).
- :class:`FlowOptions`: a flow's blocks also estimate a log-determinant (``logdet``), and the flow
  has a base density (``learned_prior``). A flow's ``coeff`` must lie in :math:`(0, 1)`.
- :class:`ToyFlowOptions`, :class:`ImageFlowOptions`, :class:`HybridOptions` and
  :class:`ClassifierOptions`: those of :func:`~iresnet.models.toy_flow`,
  :func:`~iresnet.models.image_flow`, :func:`~iresnet.models.hybrid_model` and
  :func:`~iresnet.models.iresnet_classifier`. Only the classifier takes ``coeff=None``: its
  ResNet baseline, whose branches nothing constrains.

:func:`merge_options` updates a mapping of options by another, nested options (the log-det
estimator's) merged key by key (see :func:`~iresnet.core.logdet.update_spec`).

>>> ToyFlowOptions.from_dict({"hidden": 16, "coeff": None})  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
ValueError: coeff must be a number in (0, 1) ..., got None; null ... is only for the classifier's ...
>>> ClassifierOptions.from_dict({"blocks": [2, 2], "hidden": [8, 16], "coeff": None}).blocks
(2, 2)
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ..core.inverse import INVERSE_METHODS, MAX_ITER
from ..core.lipschitz import DEFAULT_COEFF, DEFAULT_POWER_ITERATIONS
from ..core.logdet import LogDetEstimator, make_estimator, update_spec
from ..core.validation import check_choice, check_coeff, check_count, check_flag, check_interval, check_stages
from .blocks import BLOCKS
from .branches import ACTIVATIONS, LIPSCHITZ

__all__ = [
    "BranchOptions",
    "ClassifierOptions",
    "FlowOptions",
    "HybridOptions",
    "ImageFlowOptions",
    "ToyFlowOptions",
    "merge_options",
]

DEQUANTIZATIONS = ("uniform", "variational")
"""The image flows' dequantisations (:class:`ImageFlowOptions`)."""

_Options = TypeVar("_Options", bound="BranchOptions")

LogDetSpec = str | Mapping[str, Any] | LogDetEstimator
"""A log-det estimator as :func:`~iresnet.core.logdet.make_estimator` takes it."""


@dataclass(frozen=True)
class BranchOptions:
    """What every residual block of a model shares: its branch and its inverse.

    Arguments:
        coeff: the bound on each branch layer's norm (see ``lipschitz``), and so on each branch's
            Lipschitz constant, in :math:`(0, 1)`.
        lipschitz: how each branch layer's norm is held at ``coeff``: ``"spectral"``, spectral
            normalisation (:func:`~iresnet.spectral_norm`, power iteration), or ``"aol"``, the
            almost-orthogonal rescaling (:func:`~iresnet.aol`: guaranteed at every step, nothing
            to converge, looser).
        activation: the branches' activation, ``"lipswish"``, ``"elu"`` or ``"relu"`` (all 1-Lipschitz).
        power_iterations: power-iteration steps per training evaluation of a normalised weight
            (spectral normalisation only).
        inverse_method: how a block is inverted, ``"fixed_point"`` (Banach iteration) or ``"anderson"``.
        atol, rtol: the inversion's stopping rule :math:`|f(x) - x| \\le atol + rtol |f(x)|`
            (``None``: by dtype, about 1e-5 in float32 and 1e-10 in float64).
        max_iter: the most iterations of an inversion (and of its implicit gradient).
    """

    builder: ClassVar[str] = ""
    """The builder these options are for, named in messages."""
    coeff_optional: ClassVar[bool] = False
    """Whether ``coeff=None`` (unnormalised branches) is allowed."""

    coeff: float | None = DEFAULT_COEFF  # None only where coeff_optional
    lipschitz: str = LIPSCHITZ[0]
    activation: str = "lipswish"
    power_iterations: int = DEFAULT_POWER_ITERATIONS
    inverse_method: str = INVERSE_METHODS[0]
    atol: float | None = None
    rtol: float | None = None
    max_iter: int = MAX_ITER

    def __post_init__(self) -> None:
        check_coeff(self.coeff, optional=self.coeff_optional)
        check_choice("lipschitz", self.lipschitz, LIPSCHITZ)
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        check_count("power_iterations", self.power_iterations)
        check_choice("inverse_method", self.inverse_method, INVERSE_METHODS)
        check_interval("atol", self.atol, 0, optional=True)
        check_interval("rtol", self.rtol, 0, optional=True)
        check_count("max_iter", self.max_iter)

    @classmethod
    def names(cls) -> list[str]:
        """The options, the builder's own first: each class's fields in the order it declares
        them, from the builder's class to this one."""
        fields = {f.name for f in dataclasses.fields(cls)}
        names: list[str] = []
        for klass in cls.__mro__:
            if dataclasses.is_dataclass(klass):
                names += [name for name in inspect.get_annotations(klass) if name in fields and name not in names]
        return names

    @classmethod
    def from_dict(cls: type[_Options], options: Mapping[str, Any]) -> _Options:
        """The options in ``options`` (a mapping of option names to values, as JSON gives them:
        a list, checked as it is given, is kept as a tuple), the defaults for the rest.
        ``ValueError`` for an unknown name, listing the builder's options, and for a bad value,
        naming the option and the value."""
        names = cls.names()
        unknown = [key for key in options if key not in names]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown model option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for "
                f"{cls.builder}; its options: {', '.join(names)}{hint}"
            )
        return cls(**options)

    @classmethod
    def resolve(cls: type[_Options], options: _Options | None, changes: Mapping[str, Any]) -> _Options:
        """A builder's options: ``options`` (default: the defaults) with ``changes``, the keyword
        arguments it was called with, replacing options of the same name."""
        if options is None:
            return cls.from_dict(changes)
        if not isinstance(options, cls):
            raise TypeError(f"{cls.builder} takes options of type {cls.__name__}, got {type(options).__name__}")
        return cls.from_dict({**options.to_dict(), **changes}) if changes else options

    def to_dict(self) -> dict[str, Any]:
        """Every option and its value, in the order of :meth:`names` (tuples stay tuples)."""
        return {name: getattr(self, name) for name in self.names()}

    def branch_options(self) -> dict[str, Any]:
        """The keyword arguments of the branch builders in :mod:`iresnet.models.branches`."""
        return {"activation": self.activation, "power_iterations": self.power_iterations, "lipschitz": self.lipschitz}

    def block_options(self) -> dict[str, Any]:
        """The keyword arguments of every :class:`~iresnet.ResidualBlock`: the inverse's settings."""
        return {"inverse_method": self.inverse_method, "atol": self.atol, "rtol": self.rtol, "max_iter": self.max_iter}


@dataclass(frozen=True)
class FlowOptions(BranchOptions):
    """A flow's options: those of :class:`BranchOptions` (``coeff`` in :math:`(0, 1)`, never
    ``None``: a flow's blocks must be invertible, its log-det series convergent), and

    Arguments:
        logdet: the blocks' log-det estimator: ``"exact"``, ``"series"``, ``"roulette"``, or a
            mapping of a name and options (``{"name": "roulette", "n_exact_terms": 5}``, see
            :mod:`iresnet.core.logdet`; without a name, options of the default estimator), or an
            estimator.
        learned_prior: a base density with a learned mean and scale per latent dimension.
        block: the blocks (:mod:`iresnet.models.blocks`): ``"resflow"`` (Residual Flows' residual
            blocks), ``"densenet"`` (i-DenseNets' dense branches,
            :func:`~iresnet.models.branches.dense_branch`; ``hidden`` is then about the features the
            dense layers add, and LipSwish is concatenated: CLipSwish), ``"monotone"`` (Monotone Flows'
            Cayley blocks, :class:`~iresnet.MonotoneBlock`) or ``"implicit"`` (Implicit Normalizing
            Flows' blocks, :class:`~iresnet.ImplicitBlock`, two branches each: twice the parameters).
            The last two have Residual Flows' branches and solve a fixed point in every forward pass.
    """

    logdet: LogDetSpec = "roulette"
    learned_prior: bool = False
    block: str = "resflow"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.logdet is None:
            raise ValueError("logdet must name an estimator, not null: a flow's likelihood needs the log-determinant")
        if isinstance(self.logdet, Mapping):  # its own copy; without a name, options of the default estimator
            default = type(self).logdet  # the field's default, which a dataclass keeps as the class attribute
            object.__setattr__(self, "logdet", update_spec(default, self.logdet))
        make_estimator(self.logdet)  # raises for an unknown name, option or value
        check_flag("learned_prior", self.learned_prior)
        check_choice("block", self.block, BLOCKS)
        if self.block == "densenet" and self.lipschitz != "spectral":
            raise ValueError(
                f"block 'densenet' holds its layers' norms by spectral normalisation; lipschitz {self.lipschitz!r} is "
                "for the 'resflow' branches only"
            )

    def branch_coeff(self) -> float:
        """``coeff`` as the flow's branch builders take it: a number, never ``None`` (refused above)."""
        if self.coeff is None:
            raise ValueError(f"{self.builder}: coeff must be a number in (0, 1), got None")
        return self.coeff


@dataclass(frozen=True)
class ToyFlowOptions(FlowOptions):
    """The options of :func:`~iresnet.models.toy_flow` (and those of :class:`FlowOptions`).

    Arguments:
        blocks: the number of residual blocks.
        hidden: the width of each branch's hidden layers.
        depth: the number of linear layers in each branch.
        actnorm: an ActNorm before every block.
        logdet: as in :class:`FlowOptions`; ``"exact"`` by default, cheap in low dimensions.
    """

    builder: ClassVar[str] = "toy_flow"

    blocks: int = 8
    hidden: int = 128
    depth: int = 3
    actnorm: bool = True
    logdet: LogDetSpec = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("blocks", "hidden", "depth"):
            check_count(name, getattr(self, name))
        check_flag("actnorm", self.actnorm)


@dataclass(frozen=True)
class ImageFlowOptions(FlowOptions):
    """The options of :func:`~iresnet.models.image_flow` (and those of :class:`FlowOptions`).

    Arguments:
        scales: the number of stages, a squeeze between two.
        blocks: residual blocks per stage.
        hidden: the channels of the convolutional branches' hidden layers.
        logit_alpha: the logit transform's :math:`\\alpha` in :math:`(0, 0.5)` (Residual Flows), or
            ``None`` for a shift to :math:`[-0.5, 0.5)` instead (i-ResNet).
        squeeze_first: squeeze before the first stage.
        factor_out: factor half the channels out to the prior at each squeeze.
        fc_blocks: fully-connected residual blocks at the end of the last stage.
        fc_hidden: the width of their hidden layers.
        dequantization: ``"uniform"`` (:class:`~iresnet.data.UniformDequantize`) or ``"variational"``
            (:class:`~iresnet.data.VariationalDequantize`, a learned noise density, Flow++).
    """

    builder: ClassVar[str] = "image_flow"

    scales: int = 3
    blocks: int = 4
    hidden: int = 64
    logit_alpha: float | None = 0.05
    squeeze_first: bool = False
    factor_out: bool = True
    fc_blocks: int = 0
    fc_hidden: int = 128
    dequantization: str = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("scales", "blocks", "hidden", "fc_hidden"):
            check_count(name, getattr(self, name))
        check_count("fc_blocks", self.fc_blocks, 0)
        alpha = self.logit_alpha
        if alpha is not None and (
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5
        ):
            raise ValueError(f"logit_alpha must be a number in (0, 0.5), or null for no logit, got {alpha!r}")
        for name in ("squeeze_first", "factor_out"):
            check_flag(name, getattr(self, name))
        check_choice("dequantization", self.dequantization, DEQUANTIZATIONS)


@dataclass(frozen=True)
class HybridOptions(ImageFlowOptions):
    """The options of :func:`~iresnet.models.hybrid_model`: those of :class:`ImageFlowOptions`, and

    Arguments:
        classifier: ``"linear"``, a linear layer on the last scale's latent, or ``"gaussians"``,
            Bayes' rule on a prior of one Gaussian per class (fixed means: no ``learned_prior``).
    """

    builder: ClassVar[str] = "hybrid_model"

    classifier: str = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("classifier", self.classifier, ("linear", "gaussians"))
        if self.classifier == "gaussians" and self.learned_prior:
            raise ValueError("the class-conditional prior has fixed means: learned_prior must be False")


@dataclass(frozen=True)
class ClassifierOptions(BranchOptions):
    """The options of :func:`~iresnet.models.iresnet_classifier` (and those of :class:`BranchOptions`).

    Arguments:
        pad_channels: zero channels appended to the input.
        blocks: residual blocks of each stage, one entry per stage.
        hidden: the bottleneck width of each stage's branches, one entry per stage.
        coeff: as in :class:`BranchOptions`, or ``None``: unnormalised branches, a plain ResNet
            (the baseline), whose trunk need not be invertible.
        activation: as in :class:`BranchOptions`; ``"elu"`` by default, as in the paper.
    """

    builder: ClassVar[str] = "iresnet_classifier"
    coeff_optional: ClassVar[bool] = True

    pad_channels: int = 0
    blocks: tuple[int, ...] = (4, 4, 4)
    hidden: tuple[int, ...] = (32, 64, 128)
    coeff: float | None = DEFAULT_COEFF
    activation: str = "elu"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("pad_channels", self.pad_channels, 0)
        check_stages("blocks", self.blocks)
        check_stages("hidden", self.hidden)
        if len(self.blocks) != len(self.hidden):
            raise ValueError(f"blocks and hidden need one entry per stage, got {self.blocks} and {self.hidden}")
        for name in ("blocks", "hidden"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


def merge_options(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (model options as a mapping) updated by ``update``: each option of ``update``
    replaces that of ``base``, but for the log-det estimator, whose options are merged while it
    stays the same estimator (:func:`~iresnet.core.logdet.update_spec`): overriding one of a
    preset's roulette options keeps the others.

    >>> preset = {"hidden": 512, "logdet": {"name": "roulette", "distribution": "poisson", "memory_efficient": True}}
    >>> merge_options(preset, {"hidden": 64, "logdet": {"n_exact_terms": 5}})["logdet"]
    {'name': 'roulette', 'distribution': 'poisson', 'memory_efficient': True, 'n_exact_terms': 5}
    """
    merged = dict(base)
    for key, value in update.items():
        merged[key] = update_spec(merged[key], value) if key == "logdet" and key in merged else value
    return merged
