r"""The i-ResNet classifier: an invertible trunk (optional zero-padding of channels, stages of
conv residual blocks with squeezes between them, ActNorm) and a non-invertible head
(BatchNorm, nonlinearity, global average pooling, linear). With ``coeff=None`` the same network
has unconstrained branches: a plain ResNet baseline, whose trunk need not be invertible."""

from __future__ import annotations

from torch import Tensor, nn

from ..core.layers import ActNorm, InjectivePad, Squeeze
from ..core.residual import ResidualBlock
from ..core.validation import check_coeff, check_count, check_stages
from ..data.preprocess import Rescale
from ..flows.composition import Sequential
from .branches import conv_branch

__all__ = ["Classifier", "iresnet_classifier"]


class Classifier(nn.Module):
    """``head(trunk(x))``: logits from the features of an invertible trunk; ``features`` and
    ``reconstruct`` go from inputs to features and back through the trunk's inverse."""

    def __init__(self, trunk: Sequential, head: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)[0]

    def reconstruct(self, features: Tensor) -> Tensor:
        """The input whose features these are (by fixed-point iteration in every block; raises
        :class:`~iresnet.InversionError` where it does not converge, as for a plain ResNet)."""
        return self.trunk.inverse(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def iresnet_classifier(
    shape: tuple[int, int, int],
    classes: int = 10,
    *,
    levels: int | None = None,
    pad_channels: int = 0,
    blocks: tuple[int, ...] = (4, 4, 4),
    hidden: tuple[int, ...] = (32, 64, 128),
    coeff: float | None = 0.9,
    activation: str = "elu",
    power_iterations: int = 1,
) -> Classifier:
    """The i-ResNet classifier for images of ``shape`` ``(C, H, W)``: integer images with
    ``levels`` levels rescaled to ``[-0.5, 0.5]`` (``None``: inputs taken as they are),
    ``pad_channels`` zero channels, then stage ``i`` of ``blocks[i]`` times ``[ActNorm, residual block]`` with the
    bottleneck branch of width ``hidden[i]`` (coefficient ``coeff``; ``None`` for a plain ResNet),
    a squeeze between stages; the head is BatchNorm, ReLU, global average pooling and a linear
    layer. The paper's CIFAR-10 model: ``pad_channels=13, blocks=(13, 13, 13)``.

    References:
        Behrmann et al., "Invertible Residual Networks", ICML 2019, https://arxiv.org/abs/1811.00995

    Example:
        >>> model = iresnet_classifier((1, 8, 8), 10, pad_channels=3, blocks=(1, 1), hidden=(8, 8))
        >>> model(torch.randn(5, 1, 8, 8)).shape
        torch.Size([5, 10])
    """
    check_count("classes", classes)
    check_count("pad_channels", pad_channels, 0)
    check_count("power_iterations", power_iterations)
    check_stages("blocks", blocks)
    check_stages("hidden", hidden)
    check_coeff(coeff, optional=True)
    if len(blocks) != len(hidden):
        raise ValueError(f"blocks and hidden need one entry per stage, got {blocks} and {hidden}")
    c, h, w = shape
    if h % 2 ** (len(blocks) - 1) or w % 2 ** (len(blocks) - 1):
        raise ValueError(f"an image of {h}x{w} cannot be squeezed between {len(blocks)} stages")
    layers: list[nn.Module] = [Rescale(levels)] if levels is not None else []
    if pad_channels:
        layers.append(InjectivePad(pad_channels))
    c += pad_channels
    for i, (n_blocks, width) in enumerate(zip(blocks, hidden)):
        if i:
            layers.append(Squeeze())
            c *= 4
        for _ in range(n_blocks):
            branch = conv_branch(c, width, coeff, activation=activation, power_iterations=power_iterations)
            layers += [ActNorm(c), ResidualBlock(branch, logdet=None)]
    head = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))
    return Classifier(Sequential(*layers), head)
