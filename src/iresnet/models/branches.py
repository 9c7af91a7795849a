"""Residual branches ``g`` with :math:`\\mathrm{Lip}(g) \\le c`: spectral-normalised layers and
1-Lipschitz activations, the activation first (pre-activation), as in the Residual Flows models."""

from __future__ import annotations

from torch import nn

from ..core.activations import LipSwish
from ..core.lipschitz import spectral_norm
from ..core.validation import check_choice

__all__ = ["ACTIVATIONS", "mlp_branch", "conv_branch", "flat_branch"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"lipswish": LipSwish, "elu": nn.ELU, "relu": nn.ReLU}


def _activation(name: str) -> nn.Module:
    check_choice("activation", name, tuple(ACTIVATIONS))
    return ACTIVATIONS[name]()


def mlp_branch(
    dim: int, hidden: int, coeff: float, *, depth: int, activation: str, power_iterations: int
) -> nn.Sequential:
    """``act, Linear(dim, hidden), act, ..., Linear(hidden, dim)`` with ``depth`` linear layers.
    The builders' options (:mod:`iresnet.models.options`) hold the defaults."""
    sizes = [dim] + [hidden] * (depth - 1) + [dim]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [_activation(activation), spectral_norm(nn.Linear(fan_in, fan_out), coeff, power_iterations)]
    return nn.Sequential(*layers)


def conv_branch(
    channels: int, hidden: int, coeff: float | None, *, activation: str, power_iterations: int
) -> nn.Sequential:
    """The i-ResNet bottleneck ``act, 3x3 conv, act, 1x1 conv, act, 3x3 conv`` (``channels ->
    hidden -> hidden -> channels``), each convolution normalised as an operator to ``coeff``
    (``None``: not normalised, the branch of a plain ResNet)."""
    shapes = [(channels, hidden, 3), (hidden, hidden, 1), (hidden, channels, 3)]
    layers: list[nn.Module] = []
    for fan_in, fan_out, kernel in shapes:
        conv = nn.Conv2d(fan_in, fan_out, kernel, padding=kernel // 2)
        layers += [_activation(activation), conv if coeff is None else spectral_norm(conv, coeff, power_iterations)]
    return nn.Sequential(*layers)


def flat_branch(
    shape: tuple[int, int, int], hidden: int, coeff: float, *, activation: str, power_iterations: int
) -> nn.Sequential:
    """An MLP branch on a flattened ``(C, H, W)`` feature map, reshaped back: the fully-connected
    blocks that end the Residual Flows image models."""
    dim = shape[0] * shape[1] * shape[2]
    mlp = mlp_branch(dim, hidden, coeff, depth=3, activation=activation, power_iterations=power_iterations)
    return nn.Sequential(nn.Flatten(), *mlp, nn.Unflatten(1, shape))
