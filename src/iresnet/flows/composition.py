r"""The composition of invertible layers, :class:`Sequential`."""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from ..core.invertible import Invertible, InvertibleLayer, layer_shape, sum_logdets

__all__ = ["Sequential"]


class Sequential(InvertibleLayer, nn.Sequential):
    r"""The composition of invertible layers, applied in order: for :math:`f_n \circ \dots \circ f_1`
    the log-dets add up (:func:`~iresnet.core.invertible.sum_logdets`: ``None`` if any layer
    gives ``None``), the inverse runs the layers' inverses in reverse order, and the shapes
    follow each layer's ``forward_shape`` (kept by a module without one).

    Example:
        >>> flow = Sequential(ActNorm(2), Squeeze())
        >>> y, logdet = flow(torch.randn(8, 2, 4, 4))
        >>> y.shape, logdet.shape, flow.forward_shape((2, 4, 4))
        (torch.Size([8, 8, 2, 2]), torch.Size([8]), (8, 2, 2))
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        logdets = []
        for layer in self:
            x, logdet = layer(x)
            logdets.append(logdet)
        return x, sum_logdets(logdets, x)

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self):
            y = cast(Invertible, layer).inverse(y)
        return y

    def forward_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for layer in self:
            shape = layer_shape(layer, "forward_shape", shape)
        return tuple(shape)

    def inverse_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for layer in reversed(self):
            shape = layer_shape(layer, "inverse_shape", shape)
        return tuple(shape)
