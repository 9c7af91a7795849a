r"""A residual branch as a pure function of its tensors, compiled once per architecture.

``torch.compile`` on a module specialises on that module (and ``parametrize`` gives each
parametrized layer a class of its own), so sixteen identical blocks would compile sixteen times,
past dynamo's limit. :func:`compiled_iteration` describes ``g`` instead by a static tuple of
layer kinds and settings plus the list of its tensors (weights as the layers use them, biases,
activation parameters); one compiled function, with a dynamic batch size, runs a fixed-point
iteration of every branch of the same architecture: ``g``, the update and the stopping rule's
arithmetic, fused. For the inverse, which iterates many times on a shrinking set of samples.

Example:
    >>> g = nn.Sequential(nn.Linear(2, 8), LipSwish(), nn.Linear(8, 2))
    >>> x, y = torch.randn(5, 2), torch.randn(5, 2)
    >>> fx, largest_step, converged = compiled_iteration(g, atol=1e-5, rtol=1e-5)(x, y)
    >>> bool(torch.allclose(fx, y - g(x), atol=1e-6))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import CLipSwish, LipSwish, clipswish
from .dense import DenseLayer, dense_weights
from .inverse import iteration_step
from .jacobian import linearization_refusal, parts

__all__ = ["compiled_iteration", "memory_lean"]

ACTIVATION_MEMORY_BUDGET = 0.5


def memory_lean() -> contextlib.AbstractContextManager:
    """The setting under which to call a compiled model for training (it applies when the graph
    is compiled, at its first call): AOTAutograd's partitioner then recomputes cheap forward
    activations in the backward pass instead of saving them (``activation_memory_budget`` 0.5).
    Measured on the toy benchmark's step: autograd's saved tensors 9.2 MiB against 41.6 MiB with
    the default partitioner (normflows, eager: 29.4), at the same speed."""
    return torch._functorch.config.patch(activation_memory_budget=ACTIVATION_MEMORY_BUDGET)


Spec = tuple[tuple, ...]


def _describe(part: nn.Module) -> tuple[tuple, list[Tensor]]:
    """A layer's static description and its tensors."""
    if isinstance(part, DenseLayer):
        tensors, spec = _described_parts(part.network)
        return ("dense", part.coeff, spec), [part.raw_eta, *tensors]
    if isinstance(part, nn.Linear):
        return ("linear", part.bias is not None), [part.weight] + ([part.bias] if part.bias is not None else [])
    if isinstance(part, nn.Conv2d):
        static = ("conv", part.bias is not None, part.stride, part.padding, part.dilation)
        return static, [part.weight] + ([part.bias] if part.bias is not None else [])
    if isinstance(part, LipSwish):
        return ("lipswish",), [part.raw_beta]
    if isinstance(part, CLipSwish):
        return ("clipswish",), [part.raw_beta]
    if isinstance(part, nn.ELU):
        return ("elu", part.alpha), []
    if isinstance(part, nn.ReLU):
        return ("relu",), []
    if isinstance(part, nn.Identity):
        return ("identity",), []
    if isinstance(part, nn.Flatten):
        return ("flatten", part.start_dim, part.end_dim), []
    if isinstance(part, nn.Unflatten):
        return ("unflatten", part.dim, tuple(part.unflattened_size)), []
    raise TypeError(f"no functional form for {type(part).__name__}")


def _evaluate(x: Tensor, tensors: list[Tensor], spec: Spec) -> Tensor:
    return _run(x, iter(tensors), spec)


def _run(x: Tensor, remaining: Iterator[Tensor], spec: Spec) -> Tensor:
    for kind, *static in spec:
        if kind in ("linear", "conv"):
            weight = next(remaining)
            bias = next(remaining) if static[0] else None
            x = F.linear(x, weight, bias) if kind == "linear" else F.conv2d(x, weight, bias, *static[1:])
        elif kind == "lipswish":
            x = x * torch.sigmoid(F.softplus(next(remaining)) * x) / 1.1
        elif kind == "clipswish":
            x = clipswish(x, F.softplus(next(remaining)))
        elif kind == "dense":
            eta = dense_weights(next(remaining), static[0])
            x = torch.cat([eta[0] * x, eta[1] * _run(x, remaining, static[1])], dim=1)
        elif kind == "elu":
            x = F.elu(x, static[0])
        elif kind == "relu":
            x = F.relu(x)
        elif kind == "flatten":
            x = x.flatten(*static)
        elif kind == "unflatten":
            x = x.unflatten(*static)
    return x


def _iteration(x: Tensor, y: Tensor, tensors: list[Tensor], spec: Spec, atol: float, rtol: float):
    return iteration_step(lambda h: _evaluate(h, tensors, spec), x, y, atol, rtol)


_compiled_iteration = torch.compile(_iteration, dynamic=True)


def _described(g: nn.Module) -> tuple[list[Tensor], Spec]:
    refusal = linearization_refusal(g)
    if refusal is not None:
        raise TypeError(f"cannot compile the branch as a function: {refusal}")
    return _described_parts(g)


def _described_parts(g: nn.Module) -> tuple[list[Tensor], Spec]:
    spec, tensors = [], []
    for part in parts(g):
        static, own = _describe(part)
        spec.append(static)
        tensors += own
    return tensors, tuple(spec)


def compiled_iteration(g: nn.Module, atol: float, rtol: float) -> Callable[[Tensor, Tensor], tuple]:
    """One fixed-point iteration for :func:`iresnet.solve_fixed_point` through one compiled
    function per architecture: ``(x, y) -> (y - g(x), max |update| per sample, converged per
    sample)``, converged meaning :math:`|f(x) - x| \\le atol + rtol |f(x)|` elementwise. ``g``'s
    tensors are taken as they are now: call inside ``parametrize.cached()`` with the power
    iteration frozen, as an inversion does. Raises ``TypeError`` for a branch of other modules
    than :func:`iresnet.linearize` takes."""
    tensors, spec = _described(g)
    return lambda x, y: _compiled_iteration(x, y, tensors, spec, atol, rtol)
