r"""Explicit Jacobian products of a residual branch, without autograd.

A branch :math:`g = f_m \circ \dots \circ f_1` built from affine layers and elementwise
activations is *linearised* at :math:`x` in one forward pass: each layer keeps what its Jacobian
needs (the weight of an affine layer; the derivative :math:`\phi'(a)` at the pre-activation of an
activation). Then

.. math:: J_g v = J_{f_m} \cdots J_{f_1} v, \qquad u^\top J_g = u^\top J_{f_m} \cdots J_{f_1},

are plain matrix products and convolutions: ``conv2d`` for :math:`W v`, ``conv_transpose2d``
for :math:`W^\top u`, a product with :math:`\phi'(a)` for an activation. The factors carry the
graph to the parameters and to :math:`x` (through :math:`\phi'(a)`), so a log-determinant
estimated from them is differentiated by one ordinary, first-order backward pass, and
``torch.compile`` accepts it.

Which modules are linearised is a registry keyed by exact type (:func:`register_linearization`):
``nn.Linear``, ``nn.Conv2d`` (spectral-normalised or not, zero padding), :class:`LipSwish`,
``nn.ELU``, ``nn.ReLU``, ``nn.Identity``, ``nn.Flatten``, ``nn.Unflatten`` and plain
``nn.Sequential`` chains of them. Anything else (a subclass with its own ``forward``, a module
with forward hooks) is refused, and :class:`~iresnet.ResidualBlock` falls back to autograd.

Example:
    >>> g = nn.Sequential(nn.Linear(3, 8), LipSwish(), nn.Linear(8, 3))
    >>> x, v = torch.randn(4, 3), torch.randn(4, 3)
    >>> products = linearize(g, x)
    >>> reference = torch.autograd.functional.jvp(g, x, v)[1]
    >>> bool(torch.allclose(products.jvp(v), reference, atol=1e-6))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .activations import LipSwish
from .lipschitz import records_input_shape

__all__ = ["Linearization", "linearize", "linearization_refusal", "register_linearization"]


class LayerJacobian(Protocol):
    """One layer's Jacobian at the point it was linearised: ``jvp(t) = J t``, ``vjp(u) = J^T u``
    (both per sample, batched along dimension 0)."""

    def jvp(self, t: Tensor) -> Tensor: ...

    def vjp(self, u: Tensor) -> Tensor: ...


class _Diagonal:
    """An elementwise map's Jacobian, ``diag(phi'(a))``."""

    def __init__(self, derivative: Tensor) -> None:
        self.derivative = derivative

    def jvp(self, t: Tensor) -> Tensor:
        return self.derivative * t

    vjp = jvp


class _Dense:
    """``h -> W h + b``: ``J t = W t``, ``J^T u = W^T u``."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight

    def jvp(self, t: Tensor) -> Tensor:
        return F.linear(t, self.weight)

    def vjp(self, u: Tensor) -> Tensor:
        return u @ self.weight


class _Convolution:
    """A convolution's linear part; its adjoint is the transposed convolution with the same
    weight, stride, padding and dilation, and the output padding that restores the input size."""

    def __init__(
        self, layer: nn.Conv2d, weight: Tensor, input_size: tuple[int, int], output_size: tuple[int, int]
    ) -> None:
        self.weight = weight
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.output_padding = tuple(
            size - ((out - 1) * stride - 2 * pad + dil * (k - 1) + 1)
            for size, out, stride, pad, dil, k in zip(
                input_size, output_size, layer.stride, layer.padding, layer.dilation, weight.shape[2:]
            )
        )

    def jvp(self, t: Tensor) -> Tensor:
        return F.conv2d(t, self.weight, None, self.stride, self.padding, self.dilation)

    def vjp(self, u: Tensor) -> Tensor:
        return F.conv_transpose2d(
            u, self.weight, None, self.stride, self.padding, self.output_padding, 1, self.dilation
        )


class _Reshape:
    """A reshape of each sample: its Jacobian is the identity, reshaped."""

    def __init__(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> None:
        self.input_shape, self.output_shape = input_shape, output_shape

    def jvp(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], *self.output_shape)

    def vjp(self, u: Tensor) -> Tensor:
        return u.reshape(u.shape[0], *self.input_shape)


Rule = Callable[[nn.Module, Tensor], tuple[Tensor, LayerJacobian | None]]
"""A linearisation rule: ``(module, input) -> (output, Jacobian)``; ``None`` for the identity."""

_RULES: dict[type[nn.Module], Rule] = {}


def register_linearization(module_type: type[nn.Module], rule: Rule) -> None:
    """Teach :func:`linearize` a module type (matched exactly, not its subclasses): ``rule(module,
    h)`` returns the module's output at ``h`` and its Jacobian there, an object with ``jvp`` and
    ``vjp`` (see :class:`LayerJacobian`). The output must equal ``module(h)``; the Jacobian's
    factors must carry the graph to the parameters and to ``h``."""
    _RULES[module_type] = rule


def _affine(layer: nn.Linear | nn.Conv2d, h: Tensor) -> tuple[Tensor, LayerJacobian]:
    out = layer(h)  # runs the layer's pre-hooks (a convolution's spectral norm learns its input size)
    weight = layer.weight  # inside parametrize.cached(): the tensor the call above used
    if isinstance(layer, nn.Linear):
        return out, _Dense(weight)
    return out, _Convolution(layer, weight, tuple(h.shape[2:]), tuple(out.shape[2:]))


def _lipswish(act: LipSwish, a: Tensor) -> tuple[Tensor, LayerJacobian]:
    # phi(a) = a s / 1.1 and phi'(a) = s (1 + beta a (1 - s)) / 1.1 share s = sigmoid(beta a)
    beta_a = act.beta * a
    s = torch.sigmoid(beta_a)
    return a * s / 1.1, _Diagonal(s * (1 + beta_a * (1 - s)) / 1.1)


def _elu(act: nn.ELU, a: Tensor) -> tuple[Tensor, LayerJacobian]:
    out = F.elu(a, act.alpha)
    # below 0: alpha e^a = elu(a) + alpha; at 0 torch's own derivative takes this branch too
    return out, _Diagonal(torch.where(a > 0, 1.0, out + act.alpha))


def _relu(act: nn.ReLU, a: Tensor) -> tuple[Tensor, LayerJacobian]:
    return F.relu(a), _Diagonal((a > 0).to(a.dtype))


def _reshape(layer: nn.Flatten | nn.Unflatten, h: Tensor) -> tuple[Tensor, LayerJacobian]:
    out = layer(h)
    if out.shape[0] != h.shape[0]:
        raise ValueError(f"{layer} merges the batch dimension; a branch must act on each sample")
    return out, _Reshape(tuple(h.shape[1:]), tuple(out.shape[1:]))


for _type, _rule in (
    (nn.Linear, _affine),
    (nn.Conv2d, _affine),
    (LipSwish, _lipswish),
    (nn.ELU, _elu),
    (nn.ReLU, _relu),
    (nn.Identity, lambda _, h: (h, None)),
    (nn.Flatten, _reshape),
    (nn.Unflatten, _reshape),
):
    register_linearization(_type, _rule)


class Linearization:
    """A branch linearised at ``x``: its value ``output`` and its Jacobian's products."""

    def __init__(self, output: Tensor, layers: list[LayerJacobian]) -> None:
        self.output = output
        self.layers = layers

    def jvp(self, v: Tensor) -> Tensor:
        """:math:`J_g(x) v` for a batch ``v`` shaped like ``x``."""
        for layer in self.layers:
            v = layer.jvp(v)
        return v

    def vjp(self, u: Tensor) -> Tensor:
        """:math:`J_g(x)^\\top u` for a batch ``u`` shaped like ``g(x)``."""
        for layer in reversed(self.layers):
            u = layer.vjp(u)
        return u


def _rule_type(module: nn.Module) -> type[nn.Module]:
    """The module's class; for a parametrized module the class that parametrize derived from."""
    if parametrize.is_parametrized(module):
        return type(module).__bases__[0]
    return type(module)


def _parts(g: nn.Module) -> list[nn.Module]:
    if type(g).forward is nn.Sequential.forward:  # nn.Sequential or a subclass keeping its forward
        return [part for child in g for part in _parts(child)]
    return [g]


def _own_hooks(module: nn.Module) -> bool:
    # a spectral norm's own pre-hook only records the input size
    pre_hooks = [h for h in module._forward_pre_hooks.values() if not records_input_shape(h)]
    return bool(pre_hooks or module._forward_hooks)


def linearization_refusal(g: nn.Module) -> str | None:
    """Why :func:`linearize` cannot take ``g`` (the first module it does not know), or ``None``."""
    for part in _parts(g):
        if _rule_type(part) not in _RULES:
            name = _rule_type(part).__name__
            return f"{name} has no registered linearisation (iresnet.jacobian.register_linearization)"
        if _own_hooks(part):
            return f"{_rule_type(part).__name__} has forward hooks, which the explicit products would skip"
        if isinstance(part, nn.Conv2d) and (part.groups != 1 or part.padding_mode != "zeros"):
            return f"{part} is grouped or not zero-padded"
    return None


def linearize(g: nn.Module, x: Tensor) -> Linearization:
    """Run ``g`` on ``x`` and keep its Jacobian's factors (see the module's docstring).

    Raises ``TypeError`` for a branch it cannot linearise (:func:`linearization_refusal`)."""
    refusal = linearization_refusal(g)
    if refusal is not None:
        raise TypeError(f"cannot linearise the branch: {refusal}")
    layers: list[LayerJacobian] = []
    with parametrize.cached():
        h = x
        for part in _parts(g):
            h, jacobian = _RULES[_rule_type(part)](part, h)
            if jacobian is not None:
                layers.append(jacobian)
    return Linearization(h, layers)
