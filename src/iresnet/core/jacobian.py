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
:class:`CLipSwish`, ``nn.ELU``, ``nn.ReLU``, ``nn.Identity``, ``nn.Flatten``, ``nn.Unflatten`` and plain
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

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import torch.nn.grad
from torch import Tensor, nn
from torch.nn.modules import module as global_hooks
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from .activations import CLIPSWISH_CONSTANT, CLipSwish, LipSwish
from .lipschitz import records_input_shape

__all__ = ["Linearization", "linearize", "linearization_refusal", "register_linearization"]


class LayerJacobian(Protocol):
    """One layer's Jacobian at the point it was linearised: ``jvp(t) = J t``, ``vjp(u) = J^T u``
    (both per sample, batched along dimension 0).

    For the Neumann surrogate's backward pass: ``graph_tensors()`` lists the tensors its factors
    are computed from (a weight; a pre-activation and the activation's parameters),
    ``rebuilt(tensors)`` is the same Jacobian from those tensors (taken in order from the
    iterator), and ``factor_gradients(r, t)`` the gradients of :math:`\\sum_{batch} \\langle r,
    J t \\rangle` with respect to ``graph_tensors()``, in order."""

    def jvp(self, t: Tensor) -> Tensor: ...

    def vjp(self, u: Tensor) -> Tensor: ...

    def graph_tensors(self) -> list[Tensor]: ...

    def rebuilt(self, tensors: Iterator[Tensor]) -> LayerJacobian: ...

    def factor_gradients(self, r: Tensor, t: Tensor) -> list[Tensor | None]: ...


class _Diagonal:
    """An elementwise map's Jacobian at the pre-activation ``a``, ``diag(phi'(a))``, with
    ``phi' = derivative(a, *parameters)``; computed once per grad mode and kept, since the
    series applies it many times."""

    def __init__(self, derivative: Callable[..., Tensor], a: Tensor, *parameters: Tensor) -> None:
        self.derivative, self.a, self.parameters = derivative, a, parameters
        self._by_grad_mode: dict[bool, Tensor] = {}

    def factor(self) -> Tensor:
        """``phi'(a)`` for the current grad mode."""
        grad_mode = torch.is_grad_enabled()
        if grad_mode not in self._by_grad_mode:
            self._by_grad_mode[grad_mode] = self.derivative(self.a, *self.parameters)
        return self._by_grad_mode[grad_mode]

    def jvp(self, t: Tensor) -> Tensor:
        return self.factor() * t

    vjp = jvp

    def graph_tensors(self) -> list[Tensor]:
        return [self.a, *self.parameters]

    def rebuilt(self, tensors: Iterator[Tensor]) -> _Diagonal:
        return type(self)(self.derivative, next(tensors), *(next(tensors) for _ in self.parameters))

    def cache_factors(self) -> None:
        self.factor()

    def factor_gradients(self, r: Tensor, t: Tensor) -> list[Tensor | None]:
        # through phi'(a, *parameters) alone: a small graph, released at once
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_() for x in self.graph_tensors()]
            derivative = self.derivative(*inputs)
            if not derivative.requires_grad:  # piecewise constant (ReLU)
                return [None] * len(inputs)
            return list(torch.autograd.grad(derivative, inputs, r * t, allow_unused=True))


class _Concatenated(_Diagonal):
    """CLipSwish's Jacobian at ``a``: with ``f = phi'(a)`` the slope of Swish (``1 - f`` that of
    its mirror image), ``J t = [f t, (f - 1) t] / L`` along dimension 1 and ``J^T [u_1, u_2] = (f u_1
    + (f - 1) u_2) / L``."""

    def jvp(self, t: Tensor) -> Tensor:
        f = self.factor()
        return torch.cat([f * t, (f - 1) * t], dim=1) / CLIPSWISH_CONSTANT

    def vjp(self, u: Tensor) -> Tensor:
        f = self.factor()
        first, second = u.chunk(2, dim=1)
        return (f * first + (f - 1) * second) / CLIPSWISH_CONSTANT

    def factor_gradients(self, r: Tensor, t: Tensor) -> list[Tensor | None]:
        # <r, J t> = <(r_1 + r_2) / L, f t> + a term free of f
        first, second = r.chunk(2, dim=1)
        return super().factor_gradients((first + second) / CLIPSWISH_CONSTANT, t)


class _Dense:
    """``h -> W h + b``: ``J t = W t``, ``J^T u = W^T u``."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight

    def jvp(self, t: Tensor) -> Tensor:
        return F.linear(t, self.weight)

    def vjp(self, u: Tensor) -> Tensor:
        return u @ self.weight

    def graph_tensors(self) -> list[Tensor]:
        return [self.weight]

    def rebuilt(self, tensors: Iterator[Tensor]) -> _Dense:
        return _Dense(next(tensors))

    def factor_gradients(self, r: Tensor, t: Tensor) -> list[Tensor | None]:
        return [r.reshape(-1, r.shape[-1]).T @ t.reshape(-1, t.shape[-1])]


class _Convolution:
    """A convolution's linear part; its adjoint is the transposed convolution with the same
    weight, stride, padding and dilation, and the output padding that restores the input size."""

    def __init__(
        self, layer: nn.Conv2d, weight: Tensor, input_size: tuple[int, ...], output_size: tuple[int, ...]
    ) -> None:
        padding = layer.padding
        if isinstance(padding, str):  # linearization_refusal refuses it
            raise TypeError(f"cannot linearise {layer}: its padding is given by name ({padding!r})")
        self.layer, self.weight, self.sizes = layer, weight, (input_size, output_size)
        self.stride, self.padding, self.dilation = layer.stride, padding, layer.dilation
        self.output_padding = tuple(
            size - ((out - 1) * stride - 2 * pad + dil * (k - 1) + 1)
            for size, out, stride, pad, dil, k in zip(
                input_size, output_size, layer.stride, padding, layer.dilation, weight.shape[2:]
            )
        )

    def jvp(self, t: Tensor) -> Tensor:
        return F.conv2d(t, self.weight, None, self.stride, self.padding, self.dilation)

    def vjp(self, u: Tensor) -> Tensor:
        return F.conv_transpose2d(
            u, self.weight, None, self.stride, self.padding, self.output_padding, 1, self.dilation
        )

    def graph_tensors(self) -> list[Tensor]:
        return [self.weight]

    def rebuilt(self, tensors: Iterator[Tensor]) -> _Convolution:
        return _Convolution(self.layer, next(tensors), *self.sizes)

    def factor_gradients(self, r: Tensor, t: Tensor) -> list[Tensor | None]:
        grad = torch.nn.grad.conv2d_weight(t, self.weight.shape, r, self.stride, self.padding, self.dilation)
        return [grad]


class _Reshape:
    """A reshape of each sample: its Jacobian is the identity, reshaped."""

    def __init__(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> None:
        self.input_shape, self.output_shape = input_shape, output_shape

    def jvp(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], *self.output_shape)

    def vjp(self, u: Tensor) -> Tensor:
        return u.reshape(u.shape[0], *self.input_shape)

    def graph_tensors(self) -> list[Tensor]:
        return []

    def rebuilt(self, tensors: Iterator[Tensor]) -> _Reshape:
        return self

    def factor_gradients(self, r: Tensor, t: Tensor) -> list[Tensor | None]:
        return []


Rule = Callable[[Any, Tensor], tuple[Tensor, LayerJacobian | None]]
"""A linearisation rule: ``(module, input) -> (output, Jacobian)``; ``None`` for the identity. The
module is an instance of the type the rule is registered for, which this type cannot say."""

_RULES: dict[type[nn.Module], Rule] = {}
_INNER: dict[type[nn.Module], Callable[[nn.Module], list[nn.Module]]] = {}


def register_linearization(
    module_type: type[nn.Module], rule: Rule, *, inner: Callable[[nn.Module], list[nn.Module]] | None = None
) -> None:
    """Teach :func:`linearize` a module type (matched exactly, not its subclasses): ``rule(module,
    h)`` returns the module's output at ``h`` and its Jacobian there, an object with the methods
    of :class:`LayerJacobian` (``jvp``, ``vjp``, and for the Neumann gradient ``graph_tensors``,
    ``rebuilt`` and ``factor_gradients``; ``cache_factors`` if it computes factors at first use),
    or ``None`` for the identity. The output must equal ``module(h)``; the factors must carry the
    graph to the parameters and to ``h``; ``jvp`` and ``vjp`` must not change Python state after
    their first call (they run inside a compiled ``while_loop``).

    A module that holds other modules and linearises them (with :func:`linearize`) names them
    by ``inner(module)``: :func:`linearization_refusal` then refuses it where it refuses one of them."""
    _RULES[module_type] = rule
    if inner is None:
        _INNER.pop(module_type, None)
    else:
        _INNER[module_type] = inner


def _affine(layer: nn.Linear | nn.Conv2d, h: Tensor) -> tuple[Tensor, LayerJacobian]:
    out = layer(h)  # runs the layer's pre-hooks (a convolution's spectral norm learns its input size)
    weight = layer.weight  # inside parametrize.cached(): the tensor the call above used
    if isinstance(layer, nn.Linear):
        return out, _Dense(weight)
    return out, _Convolution(layer, weight, tuple(h.shape[2:]), tuple(out.shape[2:]))


def _lipswish_derivative(a: Tensor, raw_beta: Tensor) -> Tensor:
    """phi'(a) = s (1 + beta a (1 - s)) / 1.1 with s = sigmoid(beta a), beta = softplus(raw_beta)."""
    beta_a = F.softplus(raw_beta) * a
    s = torch.sigmoid(beta_a)
    return s * (1 + beta_a * (1 - s)) / 1.1


def _lipswish(act: LipSwish, a: Tensor) -> tuple[Tensor, LayerJacobian]:
    return act(a), _Diagonal(_lipswish_derivative, a, act.raw_beta)


def _swish_derivative(a: Tensor, raw_beta: Tensor) -> Tensor:
    """The slope of Swish z sigmoid(beta z): s (1 + beta a (1 - s)), s = sigmoid(beta a)."""
    beta_a = F.softplus(raw_beta) * a
    s = torch.sigmoid(beta_a)
    return s * (1 + beta_a * (1 - s))


def _clipswish(act: CLipSwish, a: Tensor) -> tuple[Tensor, LayerJacobian]:
    return act(a), _Concatenated(_swish_derivative, a, act.raw_beta)


def _elu(act: nn.ELU, a: Tensor) -> tuple[Tensor, LayerJacobian]:
    def derivative(a: Tensor) -> Tensor:  # alpha e^a below 0 (at 0 too, as torch's own derivative)
        return torch.where(a > 0, 1.0, act.alpha * a.clamp(max=0).exp())  # clamped: no inf * 0 in backward

    return F.elu(a, act.alpha), _Diagonal(derivative, a)


def _relu(act: nn.ReLU, a: Tensor) -> tuple[Tensor, LayerJacobian]:
    return F.relu(a), _Diagonal(lambda a: (a > 0).to(a.dtype), a)


def _reshape(layer: nn.Flatten | nn.Unflatten, h: Tensor) -> tuple[Tensor, LayerJacobian]:
    out = layer(h)
    if out.shape[0] != h.shape[0]:
        raise ValueError(f"{layer} merges the batch dimension; a branch must act on each sample")
    return out, _Reshape(tuple(h.shape[1:]), tuple(out.shape[1:]))


for _type, _rule in (
    (nn.Linear, _affine),
    (nn.Conv2d, _affine),
    (LipSwish, _lipswish),
    (CLipSwish, _clipswish),
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

    def cache_factors(self) -> None:
        """Compute every factor for the current grad mode now (they are otherwise computed at
        first use), for code that must not change Python state, such as a ``while_loop`` body."""
        for layer in self.layers:
            cache = getattr(layer, "cache_factors", None)
            if cache is not None:
                cache()

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

    def surrogate_gradient(self, w: Tensor, v: Tensor) -> Tensor:
        """Zeros of shape ``(batch,)`` whose gradient is that of :math:`\\langle w, J_g(x) v
        \\rangle` per sample, for the parameters and ``x`` (``w`` and ``v`` held fixed): the
        Neumann surrogate's gradient without its value.

        Eagerly its backward pass recomputes the tangent pass from the pre-activations and
        weights, which the forward pass keeps anyway, so the surrogate holds no memory of its own;
        a compiled graph recomputes it in the backward pass too (``torch.utils.checkpoint``)."""
        if torch.compiler.is_compiling():
            surrogate = checkpoint(self._surrogate, w, v, use_reentrant=False)
            return surrogate - surrogate.detach()
        tensors = [t for layer in self.layers for t in layer.graph_tensors()]
        return _SurrogateGradient.apply(self.layers, w, v, *tensors)

    def _surrogate(self, w: Tensor, v: Tensor) -> Tensor:
        """:math:`\\langle w, J v \\rangle` per sample from layers rebuilt here, without caches."""
        for layer in self.layers:
            v = layer.rebuilt(iter(layer.graph_tensors())).jvp(v)
        return (w * v).flatten(1).sum(1)


class _SurrogateGradient(torch.autograd.Function):
    """Zero in value; the backward pass hands on the gradient of :math:`s = \\langle w, J v
    \\rangle` for the factors' tensors: a tangent sweep :math:`t_{i+1} = J_i t_i` from
    :math:`t_0 = v`, then an adjoint sweep :math:`r_{i} = J_i^\\top r_{i+1}` from :math:`r = w`,
    each layer giving the gradient of :math:`\\langle r_{i+1}, J_i t_i \\rangle` for its
    factors. No graph is kept between the forward and the backward pass."""

    @staticmethod
    def forward(ctx: Any, layers: list[LayerJacobian], w: Tensor, v: Tensor, *tensors: Tensor) -> Tensor:
        ctx.layers = [layer.rebuilt(iter(layer.graph_tensors())) for layer in layers]  # without their caches
        ctx.save_for_backward(w, v, *tensors)
        return w.new_zeros(w.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, upstream: Tensor) -> tuple[Tensor | None, ...]:
        w, v, *tensors = ctx.saved_tensors
        remaining = iter(tensors)
        layers = [layer.rebuilt(remaining) for layer in ctx.layers]
        r = upstream.view(-1, *[1] * (w.dim() - 1)) * w
        grads = chain_factor_gradients(layers, r, v)
        return (None, None, None, *(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[3:])))


def chain_factor_gradients(layers: list[LayerJacobian], r: Tensor, t: Tensor) -> list[Tensor | None]:
    r"""The gradients of :math:`\sum_{batch} \langle r, J_m \cdots J_1 t \rangle` for the
    ``graph_tensors()`` of ``layers`` (in order): a tangent sweep from ``t``, then an adjoint
    sweep from ``r``, each layer giving the gradient of :math:`\langle r_{i+1}, J_i t_i \rangle`
    for its factors. The ``factor_gradients`` of a layer made of a chain of others."""
    tangents = [t]
    for layer in layers[:-1]:
        tangents.append(layer.jvp(tangents[-1]))
    grads: list[Tensor | None] = []
    for i in reversed(range(len(layers))):
        grads[:0] = layers[i].factor_gradients(r, tangents[i])
        if i:
            r = layers[i].vjp(r)
    return grads


def _rule_type(module: nn.Module) -> type[nn.Module]:
    """The module's class; for a parametrized module the class that parametrize derived from."""
    if parametrize.is_parametrized(module):
        return type(module).__bases__[0]
    return type(module)


def parts(g: nn.Module) -> list[nn.Module]:
    """The layers of a branch in order, plain ``nn.Sequential`` chains opened."""
    if isinstance(g, nn.Sequential) and type(g).forward is nn.Sequential.forward:  # or a subclass keeping it
        return [part for child in g for part in parts(child)]
    return [g]


def _own_hooks(module: nn.Module) -> bool:
    # a spectral norm's own pre-hook only records the input size
    pre_hooks = [h for h in module._forward_pre_hooks.values() if not records_input_shape(h)]
    return bool(pre_hooks or module._forward_hooks or module._backward_hooks or module._backward_pre_hooks)


def _refusal(module: nn.Module) -> str | None:
    name = _rule_type(module).__name__
    if _own_hooks(module):
        return f"{name} has forward hooks, which the explicit products would skip"
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return next((r for r in map(_refusal, module) if r is not None), None)
    if _rule_type(module) not in _RULES:
        return f"{name} has no registered linearisation (iresnet.core.jacobian.register_linearization)"
    if _rule_type(module) in _INNER:
        return next((r for r in map(_refusal, _INNER[_rule_type(module)](module)) if r is not None), None)
    if isinstance(module, nn.Conv2d) and (
        module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
    ):
        return f"{module} is grouped, not zero-padded, or padded by name"
    return None


def linearization_refusal(g: nn.Module) -> str | None:
    """Why :func:`linearize` cannot take ``g`` (the first module it does not know or that has
    hooks), or ``None``."""
    hooks = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    if any(getattr(global_hooks, name, None) for name in hooks + ("_global_backward_pre_hooks",)):
        return "global module hooks are registered, which the explicit products would skip"
    return _refusal(g)


def linearize(g: nn.Module, x: Tensor, *, checked: bool = False) -> Linearization:
    """Run ``g`` on ``x`` and keep its Jacobian's factors (see the module's docstring).

    Raises ``TypeError`` for a branch it cannot linearise (:func:`linearization_refusal`);
    ``checked`` skips that check, for a caller that has just made it."""
    refusal = None if checked else linearization_refusal(g)
    if refusal is not None:
        raise TypeError(f"cannot linearise the branch: {refusal}")
    layers: list[LayerJacobian] = []
    with parametrize.cached():
        h = x
        for part in parts(g):
            h, jacobian = _RULES[_rule_type(part)](part, h)
            if jacobian is not None:
                layers.append(jacobian)
    return Linearization(h, layers)
