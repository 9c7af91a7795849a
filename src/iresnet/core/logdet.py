r"""Estimators of :math:`\log|\det(I + J_g(x))|` for a residual block :math:`x + g(x)`.

For :math:`\mathrm{Lip}(g) < 1` the log-determinant is a convergent power series,

.. math:: \log\det(I + J_g) = \sum_{k \ge 1} \frac{(-1)^{k+1}}{k} \mathrm{tr}(J_g^k),

whose traces Hutchinson's estimator :math:`\mathrm{tr}(A) = \mathbb{E}[v^\top A v]` reduces to
``k`` vector-Jacobian products each. :class:`PowerSeries` truncates the series (biased, the
i-ResNet estimator); :class:`Roulette` draws the number of terms at random and reweights each
by its survival probability (unbiased, the Residual Flows estimator); :class:`Exact` builds the
Jacobian with :mod:`torch.func` for small dimensions.

With ``memory_efficient=True`` the gradient comes from the Neumann series
:math:`\partial_\theta \log\det(I + J_g) = \sum_{k \ge 0} (-1)^k \mathrm{tr}(J_g^k \, \partial_\theta
J_g)`, estimated with the same probe and terms, and is computed during the forward pass so the
series' graph is released at once: memory no longer grows with the number of terms. The value
returned is always the estimate itself, never the gradient surrogate.

References:
    Behrmann et al., "Invertible Residual Networks", ICML 2019, https://arxiv.org/abs/1811.00995

    Chen et al., "Residual Flows for Invertible Generative Modeling", NeurIPS 2019,
    https://arxiv.org/abs/1906.02735

    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", 1989
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from .estimator import Exact, LogDetEstimator
from .roulette import Roulette
from .series import PROBES, PowerSeries

__all__ = [
    "ESTIMATORS",
    "LogDetEstimator",
    "Exact",
    "PowerSeries",
    "Roulette",
    "PROBES",
    "make_estimator",
    "update_spec",
]

_BY_NAME: dict[str, Callable[..., LogDetEstimator]] = {
    "exact": Exact,
    "series": PowerSeries,
    "roulette": Roulette,
}

ESTIMATORS = tuple(_BY_NAME)
"""The estimators' names, as a spec gives them to :func:`make_estimator`."""


def make_estimator(
    spec: str | Mapping[str, Any] | LogDetEstimator | None, setting: str = "logdet"
) -> LogDetEstimator | None:
    """An estimator from its name (``"exact"``, ``"series"``, ``"roulette"``, with default
    options), from a mapping of the name and options (``{"name": "series", "n_terms": 10}``,
    as configuration files give it), an estimator instance (returned as is) or ``None``.
    ``ValueError`` names ``setting``, the option and the choices for an unknown name or option,
    and the option and its value for a bad value.

    >>> make_estimator({"name": "series", "n_term": 10})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: logdet: unknown option 'n_term' of the 'series' estimator; its options: n_terms, n_probes, ...
    """
    if spec is None or isinstance(spec, LogDetEstimator):
        return spec
    options: dict[str, Any] = {}
    name = spec
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
    if not isinstance(name, str) or name not in _BY_NAME:
        shape = "; a mapping needs its 'name'" if isinstance(spec, Mapping) else ""
        raise ValueError(
            f"{setting} must be one of {', '.join(map(repr, ESTIMATORS))}, a mapping of a name and options, an "
            f"estimator or null, got {spec!r}{shape}"
        )
    known = list(inspect.signature(_BY_NAME[name]).parameters)
    unknown = [key for key in options if key not in known]
    if unknown:
        choices = f"its options: {', '.join(known)}" if known else "it takes none"
        raise ValueError(f"{setting}: unknown option {unknown[0]!r} of the {name!r} estimator; {choices}")
    try:
        return _BY_NAME[name](**options)
    except ValueError as error:
        raise ValueError(f"{setting}: {error}") from None


def update_spec(
    base: str | Mapping[str, Any] | LogDetEstimator | None, update: str | Mapping[str, Any] | LogDetEstimator | None
) -> str | dict[str, Any] | LogDetEstimator | None:
    """The estimator spec ``base`` updated by ``update`` (each as :func:`make_estimator` takes it).

    Options belong to an estimator: while the estimator stays the same (``update`` names it, or
    is a mapping without a ``name``) its options in ``base`` stay unless ``update`` gives them;
    another name replaces the whole spec, since the first estimator's options do not apply to
    it. An estimator instance or ``None`` replaces it too.

    >>> base = {"name": "roulette", "distribution": "poisson", "memory_efficient": True}
    >>> update_spec(base, {"n_exact_terms": 5})
    {'name': 'roulette', 'distribution': 'poisson', 'memory_efficient': True, 'n_exact_terms': 5}
    >>> update_spec(base, "roulette") == base, update_spec(base, {"name": "series", "n_terms": 3})
    (True, {'name': 'series', 'n_terms': 3})
    """
    current = {"name": base} if isinstance(base, str) else base
    new = {"name": update} if isinstance(update, str) else update
    if not isinstance(new, Mapping):
        return new
    if not isinstance(current, Mapping) or new.get("name", current.get("name")) != current.get("name"):
        return dict(new) if isinstance(update, Mapping) else update
    merged = {**current, **new}
    return merged["name"] if list(merged) == ["name"] else merged
