r"""A residual branch as a pure function of its tensors, compiled once per architecture.

``torch.compile`` on a module specialises on that module (and ``parametrize`` gives each
parametrized layer a class of its own), so sixteen identical blocks would compile sixteen times,
past dynamo's limit. :func:`compiled_branch` describes ``g`` instead by a static tuple of layer
kinds and settings plus the list of its tensors (weights as the layers use them, biases, activation
parameters); one compiled function, with a dynamic batch size, evaluates every branch of the same
architecture. For the inverse's fixed-point iteration, which calls ``g`` many times on a shrinking
set of samples.

Example:
    >>> g = nn.Sequential(nn.Linear(2, 8), LipSwish(), nn.Linear(8, 2))
    >>> x = torch.randn(5, 2)
    >>> bool(torch.allclose(compiled_branch(g)(x), g(x), atol=1e-6))
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import LipSwish
from .jacobian import linearization_refusal, parts

__all__ = ["compiled_branch"]

Spec = tuple[tuple, ...]


def _describe(part: nn.Module) -> tuple[tuple, list[Tensor]]:
    """A layer's static description and its tensors."""
    if isinstance(part, nn.Linear):
        return ("linear", part.bias is not None), [part.weight] + ([part.bias] if part.bias is not None else [])
    if isinstance(part, nn.Conv2d):
        static = ("conv", part.bias is not None, part.stride, part.padding, part.dilation)
        return static, [part.weight] + ([part.bias] if part.bias is not None else [])
    if isinstance(part, LipSwish):
        return ("lipswish",), [part.raw_beta]
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
    remaining = iter(tensors)
    for kind, *static in spec:
        if kind in ("linear", "conv"):
            weight = next(remaining)
            bias = next(remaining) if static[0] else None
            x = F.linear(x, weight, bias) if kind == "linear" else F.conv2d(x, weight, bias, *static[1:])
        elif kind == "lipswish":
            x = x * torch.sigmoid(F.softplus(next(remaining)) * x) / 1.1
        elif kind == "elu":
            x = F.elu(x, static[0])
        elif kind == "relu":
            x = F.relu(x)
        elif kind == "flatten":
            x = x.flatten(*static)
        elif kind == "unflatten":
            x = x.unflatten(*static)
    return x


_compiled_evaluate = torch.compile(_evaluate, dynamic=True)


def compiled_branch(g: nn.Module) -> Callable[[Tensor], Tensor]:
    """``x -> g(x)`` through one compiled function per architecture, with ``g``'s tensors as they
    are now (call inside ``parametrize.cached()`` and with the power iteration frozen, as an
    inversion does, so that the weights stay fixed). Raises ``TypeError`` for a branch of other
    modules than :func:`iresnet.linearize` takes."""
    refusal = linearization_refusal(g)
    if refusal is not None:
        raise TypeError(f"cannot compile the branch as a function: {refusal}")
    spec, tensors = [], []
    for part in parts(g):
        static, own = _describe(part)
        spec.append(static)
        tensors += own
    frozen = tuple(spec)
    return lambda x: _compiled_evaluate(x, tensors, frozen)
