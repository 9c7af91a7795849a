"""Residual branches ``g`` with :math:`\\mathrm{Lip}(g) \\le c`: norm-constrained linear layers and
1-Lipschitz activations, the activation first (pre-activation), as in the Residual Flows models.

Each linear layer's norm is held at ``coeff`` by the constraint named by ``lipschitz`` (one of
:data:`LIPSCHITZ`): ``"spectral"``, spectral normalisation by power iteration
(:func:`~iresnet.spectral_norm`), or ``"aol"``, the almost-orthogonal rescaling
(:func:`~iresnet.aol`, Prach and Lampert, ECCV 2022), guaranteed at every step with nothing to
converge but looser.

The dense branches of i-DenseNets (:func:`dense_branch`, :func:`dense_conv_branch`) hold their
layers' norms by spectral normalisation."""

from __future__ import annotations

from torch import nn

from ..core.activations import CLipSwish, LipSwish
from ..core.aol import aol
from ..core.dense import DenseLayer
from ..core.lipschitz import spectral_norm
from ..core.validation import check_choice, check_count

__all__ = [
    "ACTIVATIONS",
    "LIPSCHITZ",
    "DENSE_ACTIVATIONS",
    "mlp_branch",
    "conv_branch",
    "flat_branch",
    "dense_branch",
    "dense_conv_branch",
    "dense_growth",
    "dense_activation",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {"lipswish": LipSwish, "elu": nn.ELU, "relu": nn.ReLU}

DENSE_ACTIVATIONS: dict[str, type[nn.Module]] = {"clipswish": CLipSwish, **ACTIVATIONS}
"""The activations of dense branches: those of :data:`ACTIVATIONS` and CLipSwish, which doubles
the features it is given."""

LIPSCHITZ = ("spectral", "aol")
"""The constraints on a branch's linear layers: spectral normalisation or the AOL rescaling."""


def _constrained(layer: nn.Linear | nn.Conv2d, coeff: float, lipschitz: str, power_iterations: int) -> nn.Module:
    check_choice("lipschitz", lipschitz, LIPSCHITZ)
    if lipschitz == "aol":
        return aol(layer, coeff)
    return spectral_norm(layer, coeff, power_iterations)


def _activation(name: str, choices: dict[str, type[nn.Module]] = ACTIVATIONS) -> nn.Module:
    check_choice("activation", name, tuple(choices))
    return choices[name]()


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


def _dense_layers(
    width: int, growth: int, coeff: float, layers: int, activation: str, power_iterations: int, make
) -> tuple[list[nn.Module], int]:
    """``layers`` dense layers from ``width`` features, each adding ``growth``; ``make(fan_in,
    fan_out)`` builds the linear part. Returns them and the final width."""
    check_count("layers", layers, 0)
    check_count("growth", growth)
    doubles = activation == "clipswish"
    if doubles and growth % 2:
        raise ValueError(f"growth must be even with CLipSwish, which doubles the features, got {growth}")
    dense: list[nn.Module] = []
    for _ in range(layers):
        linear = spectral_norm(make(width, growth // 2 if doubles else growth), coeff, power_iterations)
        dense.append(DenseLayer(nn.Sequential(linear, _activation(activation, DENSE_ACTIVATIONS))))
        width += growth
    return dense, width


def dense_branch(
    dim: int, growth: int, coeff: float, *, layers: int, activation: str = "clipswish", power_iterations: int
) -> nn.Sequential:
    r"""The i-DenseNet branch on vectors: ``layers`` dense layers :math:`h \mapsto [\eta_1 h, \eta_2
    \phi(W h)]` (:class:`~iresnet.core.dense.DenseLayer`; :math:`W` spectral-normalised to
    ``coeff``, ``growth`` new features each), then a spectral-normalised ``Linear`` back to
    ``dim`` with coefficient ``coeff``. Each dense layer is 1-Lipschitz, so
    :math:`\mathrm{Lip}(g) \le c`. With ``"clipswish"`` (the paper's choice) :math:`W` gives
    ``growth / 2`` features, which CLipSwish doubles.

    References:
        Perugachi-Diaz, Tomczak, Bhulai, "Invertible DenseNets with Concatenated LipSwish",
        NeurIPS 2021, https://arxiv.org/abs/2102.02694

    Example:
        >>> g = dense_branch(2, 8, 0.9, layers=2, power_iterations=1)
        >>> g(torch.randn(5, 2)).shape
        torch.Size([5, 2])
        >>> iresnet.core.certificates.design_bound(g)
        0.9
    """
    dense, width = _dense_layers(dim, growth, coeff, layers, activation, power_iterations, nn.Linear)
    return nn.Sequential(*dense, spectral_norm(nn.Linear(width, dim), coeff, power_iterations))


def dense_conv_branch(
    channels: int,
    growth: int,
    coeff: float,
    *,
    layers: int,
    activation: str = "clipswish",
    power_iterations: int,
    kernel_size: int = 3,
) -> nn.Sequential:
    r"""The i-DenseNet branch on images: ``layers`` dense layers whose linear part is a
    ``kernel_size`` convolution (zero padding, the size kept; normalised as an operator to
    ``coeff``) adding ``growth`` channels each, then a normalised 1x1 convolution back to
    ``channels`` with coefficient ``coeff``: :math:`\mathrm{Lip}(g) \le c` (see
    :func:`dense_branch`).

    References:
        Perugachi-Diaz, Tomczak, Bhulai, "Invertible DenseNets with Concatenated LipSwish",
        NeurIPS 2021, https://arxiv.org/abs/2102.02694
    """
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, so that the padding keeps the size, got {kernel_size}")

    def make(fan_in: int, fan_out: int) -> nn.Conv2d:
        return nn.Conv2d(fan_in, fan_out, kernel_size, padding=kernel_size // 2)

    dense, width = _dense_layers(channels, growth, coeff, layers, activation, power_iterations, make)
    return nn.Sequential(*dense, spectral_norm(nn.Conv2d(width, channels, 1), coeff, power_iterations))


def dense_growth(hidden: int, layers: int) -> int:
    """The growth that brings ``layers`` dense layers to about ``hidden`` new features in all,
    even (CLipSwish doubles) and at least 2: how the model builders read their ``hidden`` option
    for dense branches."""
    return max(2, hidden // max(1, layers) // 2 * 2)


def dense_activation(activation: str) -> str:
    """The dense branches' activation for a model's ``activation`` option: LipSwish becomes
    CLipSwish (as in the paper), the others stay."""
    return "clipswish" if activation == "lipswish" else activation
