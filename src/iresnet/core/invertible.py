r"""The contract every invertible layer keeps, and the one way log-determinants compose.

An invertible layer is a map :math:`f` applied to each sample of a batch:

- ``y, logdet = layer(x)`` gives :math:`y = f(x)` and, per sample,
  :math:`\log|\det \partial f(x) / \partial x|` of shape ``(batch,)``, in ``x``'s dtype and on
  its device (a layer that takes integer images returns floats);
- ``layer.inverse(y)`` gives :math:`f^{-1}(y)`: ``layer.inverse(layer(x)[0])`` is ``x``;
- ``layer.forward_shape(shape)`` and ``layer.inverse_shape(shape)`` give the shape of one
  output for one input of ``shape`` (no batch dimension) and back; the same shape by default.

**A missing log-determinant.** ``logdet`` is ``None`` exactly when the layer gives no
log-determinant: it has none (``bijective = False``: :class:`~iresnet.core.layers.InjectivePad`
maps into a space of more dimensions, where :math:`\det` is not defined, and its inverse is a
left inverse only), or it was built not to compute one (``ResidualBlock(g, logdet=None)``, the
trunk of a classifier). Either way the output cannot enter a change of variables: a composition
with one ``None`` has none either (:func:`sum_logdets`), and :class:`~iresnet.Flow` refuses it.
A layer whose log-determinant is known, constant or zero, returns it: a squeeze gives zeros, an
affine map :math:`x \mapsto a x + b` on :math:`D` dimensions gives :math:`D \log|a|`.

References:
    Durkan et al., "nflows: normalizing flows in PyTorch", 2020,
    https://github.com/bayesiains/nflows (the ``forward(x) -> (y, logabsdet)`` convention)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from torch import Tensor, nn

__all__ = ["Invertible", "InvertibleLayer", "layer_shape", "sum_logdets"]


class Invertible(Protocol):
    """The contract as a type, for code that composes layers it does not define: an
    :class:`InvertibleLayer`, or any module with the same methods (the contract is duck typed)."""

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor | None]: ...

    def inverse(self, y: Tensor) -> Tensor: ...


class InvertibleLayer(nn.Module):
    r"""The base class of iresnet's invertible layers (see the module's contract).

    A subclass implements :meth:`forward` and :meth:`inverse`, and :meth:`forward_shape` and
    :meth:`inverse_shape` where it changes the shape of a sample.

    Example:
        >>> import math
        >>> class Double(InvertibleLayer):
        ...     def forward(self, x):  # y = 2x: log|det| = D log 2
        ...         return 2 * x, x.new_full((x.shape[0],), x[0].numel() * math.log(2))
        ...     def inverse(self, y):
        ...         return y / 2
        >>> y, logdet = Double()(torch.ones(4, 3))
        >>> bool(torch.equal(Double().inverse(y), torch.ones(4, 3))), logdet.shape
        (True, torch.Size([4]))
    """

    bijective: bool = True
    """Whether the layer is a bijection between spaces of one dimension, so that its
    log-determinant exists; ``False`` for an injective layer, whose ``logdet`` is always ``None``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(y, logdet)``: the output and :math:`\\log|\\det \\partial y / \\partial x|` per sample
        (``None``: no log-determinant, see the module's contract)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def inverse(self, y: Tensor) -> Tensor:
        """The input whose output is ``y``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement inverse")

    def forward_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one output for one input of ``shape`` (no batch dimension)."""
        return tuple(shape)

    def inverse_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one input for one output of ``shape`` (no batch dimension)."""
        return tuple(shape)


def sum_logdets(logdets: Iterable[Tensor | None], like: Tensor) -> Tensor | None:
    r"""The log-determinant of a composition :math:`f_n \circ \dots \circ f_1` from those of its
    layers, in order: by the chain rule,

    .. math:: \log|\det J_{f_n \circ \dots \circ f_1}(x)| = \sum_i \log|\det J_{f_i}(x_{i-1})|.

    ``None`` if any term is ``None`` (a layer without a log-determinant leaves the composition
    without one, however many layers before or after it have one); zeros of ``like``'s batch
    size, dtype and device for an empty composition (the identity).

    Example:
        >>> sum_logdets([torch.ones(2), torch.full((2,), 0.5)], torch.zeros(2, 3))
        tensor([1.5000, 1.5000])
        >>> sum_logdets([torch.ones(2), None, torch.ones(2)], torch.zeros(2, 3)) is None
        True
    """
    logdets = list(logdets)
    known = [logdet for logdet in logdets if logdet is not None]
    if len(known) < len(logdets):
        return None
    if not known:
        return like.new_zeros(like.shape[0])
    total = known[0]
    for logdet in known[1:]:
        total = total + logdet
    return total


def layer_shape(layer: nn.Module, method: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``layer.forward_shape(shape)`` or ``layer.inverse_shape(shape)`` (the name ``method``), or
    ``shape`` itself for a layer without that method, which keeps the shape of its input."""
    found = getattr(layer, method, None)
    return shape if found is None else found(shape)
