r"""The bridge to :mod:`torch.distributions`.

Modules here map data to latents, ``z, logdet = module(x)``. :func:`as_transform` wraps such a
module as a bijective :class:`~torch.distributions.Transform` in the same direction, and
:class:`Flow` is the density it defines with a base distribution,

.. math:: \log p(x) = \log p_Z(f(x)) + \log|\det J_f(x)|,

sampled by inverting :math:`f`. In ``torch.distributions`` terms,
``Flow(as_transform(m), base)`` is ``TransformedDistribution(base, [as_transform(m).inv])``.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Transform, constraints

from ..core.invertible import Invertible

__all__ = ["ModuleTransform", "as_transform", "Flow"]


class ModuleTransform(Transform):
    """A bijective ``Transform`` from a module with ``forward(x) -> (y, logdet)`` and
    ``inverse(y)``; ``event_dim`` is the number of trailing dimensions of one event. Any
    leading batch dimensions are flattened into one for the module and restored after. Event
    shapes follow the module's ``forward_shape`` / ``inverse_shape`` where it has them."""

    bijective = True

    def __init__(self, module: nn.Module, event_dim: int = 1) -> None:
        super().__init__()
        self.module = module
        self._event_dim = event_dim
        self._last: tuple[Tensor, Tensor, Tensor] | None = None
        self.domain = constraints.independent(constraints.real, event_dim)
        self.codomain = constraints.independent(constraints.real, event_dim)

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        return self._shape(shape, "forward_shape")

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return self._shape(shape, "inverse_shape")

    def _shape(self, shape: torch.Size, method: str) -> torch.Size:
        if not hasattr(self.module, method):
            return torch.Size(shape)
        split = len(shape) - self._event_dim
        return torch.Size((*shape[:split], *getattr(self.module, method)(tuple(shape[split:]))))

    def _flat(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        batch = x.shape[: x.dim() - self._event_dim]
        return x.reshape(-1, *x.shape[x.dim() - self._event_dim :]), batch

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat, batch = self._flat(x)
        y, logdet = self.module(flat)
        if logdet is None:
            raise ValueError(f"{type(self.module).__name__} computes no log-determinant (logdet=None)")
        y = y.reshape(*batch, *y.shape[1:])
        logdet = logdet.reshape(batch)
        self._last = (x, y, logdet)
        return y, logdet

    def _call(self, x: Tensor) -> Tensor:
        return self._forward(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        flat, batch = self._flat(y)
        x = cast(Invertible, self.module).inverse(flat)
        return x.reshape(*batch, *x.shape[1:])

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        if self._last is not None and self._last[0] is x and self._last[1] is y:
            return self._last[2]
        return self._forward(x)[1]

    def __repr__(self) -> str:
        return f"ModuleTransform({type(self.module).__name__}, event_dim={self._event_dim})"


def as_transform(module: nn.Module, event_dim: int = 1) -> ModuleTransform:
    """``module`` as a bijective ``torch.distributions.Transform`` (data to latent)."""
    return ModuleTransform(module, event_dim)


class Flow(Distribution):
    r"""A normalizing flow: :math:`\log p(x) = \log p_Z(f(x)) + \log|\det J_f(x)|` for a
    transform ``f`` from data to latent and a base distribution :math:`p_Z`. ``rsample``
    inverts ``f`` and is differentiable (implicit gradients through residual blocks).

    Example:
        >>> base = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), 1), 1)
        >>> flow = Flow(as_transform(ActNorm(2)), base)
        >>> flow.log_prob(torch.zeros(3, 2)).shape
        torch.Size([3])
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, transform: Transform, base: Distribution) -> None:
        self.transform = transform
        self.base = base
        shape = transform.inverse_shape(base.batch_shape + base.event_shape)
        batch_dims = len(base.batch_shape)
        super().__init__(shape[:batch_dims], shape[batch_dims:], validate_args=False)

    def log_prob(self, x: Tensor) -> Tensor:
        z = self.transform(x)
        return self.base.log_prob(z) + self.transform.log_abs_det_jacobian(x, z)

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = ()) -> Tensor:
        z = self.base.rsample(sample_shape) if self.base.has_rsample else self.base.sample(sample_shape)
        return self.transform.inv(z)

    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)
