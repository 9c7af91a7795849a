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

from collections.abc import Callable, Mapping
from typing import Any

from .estimator import Exact, LogDetEstimator
from .roulette import Roulette
from .series import PowerSeries

__all__ = ["LogDetEstimator", "Exact", "PowerSeries", "Roulette", "make_estimator"]


_BY_NAME: dict[str, Callable[..., LogDetEstimator]] = {
    "exact": Exact,
    "series": PowerSeries,
    "roulette": Roulette,
}


def make_estimator(spec: str | Mapping[str, Any] | LogDetEstimator | None) -> LogDetEstimator | None:
    """An estimator from its name (``"exact"``, ``"series"``, ``"roulette"``, with default
    options), from a mapping of the name and options (``{"name": "series", "n_terms": 10}``,
    as configuration files give it), an estimator instance (returned as is) or ``None``."""
    if spec is None or isinstance(spec, LogDetEstimator):
        return spec
    options: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        options = dict(spec)
        spec = options.pop("name", None)
    if spec not in _BY_NAME:
        raise ValueError(f"logdet must be one of {sorted(_BY_NAME)}, an estimator or None, got {spec!r}")
    return _BY_NAME[spec](**options)
