"""Residual branches ``g`` with :math:`\\mathrm{Lip}(g) \\le c`: norm-constrained linear layers and
1-Lipschitz activations, the activation first (pre-activation), as in the Residual Flows models.

Each linear layer's norm is held at ``coeff`` by the constraint named by ``lipschitz`` (one of
:data:`LIPSCHITZ`): ``"spectral"``, spectral normalisation by power iteration
(:func:`~iresnet.spectral_norm`), or ``"aol"``, the almost-orthogonal rescaling
(:func:`~iresnet.aol`, Prach and Lampert, ECCV 2022), guaranteed at every step with nothing to
converge but looser."""

from __future__ import annotations

from torch import nn

from ..core.activations import LipSwish
from ..core.aol import aol
from ..core.lipschitz import spectral_norm
from ..core.validation import check_choice

__all__ = ["ACTIVATIONS", "LIPSCHITZ", "mlp_branch", "conv_branch", "flat_branch"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"lipswish": LipSwish, "elu": nn.ELU, "relu": nn.ReLU}

LIPSCHITZ = ("spectral", "aol")
"""The constraints on a branch's linear layers: spectral normalisation or the AOL rescaling."""


def _constrained(layer: nn.Linear | nn.Conv2d, coeff: float, lipschitz: str, power_iterations: int) -> nn.Module:
    check_choice("lipschitz", lipschitz, LIPSCHITZ)
    if lipschitz == "aol":
        return aol(layer, coeff)
    return spectral_norm(layer, coeff, power_iterations)


def _activation(name: str) -> nn.Module:
    check_choice("activation", name, tuple(ACTIVATIONS))
    return ACTIVATIONS[name]()


def mlp_branch(
    dim: int,
    hidden: int,
    coeff: float,
    *,
    depth: int,
    activation: str,
    power_iterations: int,
    lipschitz: str = LIPSCHITZ[0],
) -> nn.Sequential:
    """``act, Linear(dim, hidden), act, ..., Linear(hidden, dim)`` with ``depth`` linear layers,
    each held to ``coeff`` by the constraint ``lipschitz``. The builders' options
    (:mod:`iresnet.models.options`) hold the defaults."""
    sizes = [dim] + [hidden] * (depth - 1) + [dim]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [
            _activation(activation),
            _constrained(nn.Linear(fan_in, fan_out), coeff, lipschitz, power_iterations),
        ]
    return nn.Sequential(*layers)


def conv_branch(
    channels: int,
    hidden: int,
    coeff: float | None,
    *,
    activation: str,
    power_iterations: int,
    lipschitz: str = LIPSCHITZ[0],
) -> nn.Sequential:
    """The i-ResNet bottleneck ``act, 3x3 conv, act, 1x1 conv, act, 3x3 conv`` (``channels ->
    hidden -> hidden -> channels``), each convolution normalised as an operator to ``coeff``
    (``None``: not normalised, the branch of a plain ResNet)."""
    shapes = [(channels, hidden, 3), (hidden, hidden, 1), (hidden, channels, 3)]
    layers: list[nn.Module] = []
    for fan_in, fan_out, kernel in shapes:
        conv = nn.Conv2d(fan_in, fan_out, kernel, padding=kernel // 2)
        layers += [
            _activation(activation),
            conv if coeff is None else _constrained(conv, coeff, lipschitz, power_iterations),
        ]
    return nn.Sequential(*layers)


def flat_branch(
    shape: tuple[int, int, int],
    hidden: int,
    coeff: float,
    *,
    activation: str,
    power_iterations: int,
    lipschitz: str = LIPSCHITZ[0],
) -> nn.Sequential:
    """An MLP branch on a flattened ``(C, H, W)`` feature map, reshaped back: the fully-connected
    blocks that end the Residual Flows image models."""
    dim = shape[0] * shape[1] * shape[2]
    mlp = mlp_branch(
        dim, hidden, coeff, depth=3, activation=activation, power_iterations=power_iterations, lipschitz=lipschitz
    )
    return nn.Sequential(nn.Flatten(), *mlp, nn.Unflatten(1, shape))
