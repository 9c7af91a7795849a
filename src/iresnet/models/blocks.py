"""The kinds of invertible block a flow is built from (:data:`BLOCKS`), and :func:`flow_block`,
which builds one from its branches.

- ``"resflow"``: the residual block :math:`x + g(x)` of i-ResNets and Residual Flows.
- ``"densenet"``: the same block with i-DenseNets' dense branches.
- ``"monotone"``: the Cayley transform of :math:`I + g` (:class:`~iresnet.MonotoneBlock`, Monotone
  Flows), whose Lipschitz constant is not capped at :math:`1 + \\mathrm{Lip}(g)`.
- ``"implicit"``: :math:`x + g_x(x) = z + g_z(z)` (:class:`~iresnet.ImplicitBlock`, Implicit
  Normalizing Flows), two branches per block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..core.implicit import ImplicitBlock
from ..core.invertible import InvertibleLayer
from ..core.monotone import MonotoneBlock
from ..core.residual import ResidualBlock

__all__ = ["BLOCKS", "flow_block"]

BLOCKS = ("resflow", "densenet", "monotone", "implicit")
"""The blocks the flow builders make (the ``block`` option)."""


def flow_block(block: str, branch: Callable[[], nn.Module], logdet: Any, **options: Any) -> InvertibleLayer:
    """A block of kind ``block`` (one of :data:`BLOCKS`) whose branches ``branch()`` builds (two
    for ``"implicit"``), with the estimator ``logdet`` and the inversion's ``options`` (those of
    :class:`~iresnet.ResidualBlock`).

    >>> branch = lambda: nn.Sequential(iresnet.spectral_norm(nn.Linear(2, 2), 0.5))
    >>> type(flow_block("implicit", branch, "exact")).__name__
    'ImplicitBlock'
    """
    if block == "monotone":
        return MonotoneBlock(branch(), logdet, **options)
    if block == "implicit":
        return ImplicitBlock(branch(), branch(), logdet, **options)
    return ResidualBlock(branch(), logdet, **options)
