r"""Pre-processing of discrete images as invertible steps whose log-determinants enter the
likelihood, so that one number, :func:`bits_per_dim`, accounts for all of it.

Convention. An image with ``levels`` intensity levels per dimension (256 for 8-bit data, 17
for scikit-learn's digits) holds integers :math:`x \in \{0, \dots, L-1\}^D`.
:class:`UniformDequantize` adds :math:`u \sim U[0,1)^D` and divides by :math:`L`, with
log-determinant :math:`-D \log L`: the model's log-density is then that of
:math:`x + u` on :math:`[0, L)^D`, whose expectation over :math:`u` lower-bounds the discrete
log-likelihood :math:`\log P(x)` (Theis et al., 2016). :class:`VariationalDequantize` draws
:math:`u` from a learned :math:`q(u \mid x)` instead and adds :math:`-\log q(u \mid x)` to the
log-det, a tighter bound (Ho et al., 2019). So

.. math:: \text{bits/dim} = -\log p(x + u) / (D \ln 2)
          = -\log p_{[0,1)}(\tilde x) / (D \ln 2) + \log_2 L,

the usual ``+ log2(256)`` for 8-bit data and ``+ log2(17)`` for the digits.

Each step is an :class:`~iresnet.core.invertible.InvertibleLayer`: :class:`UniformDequantize`,
then :class:`Logit` (Residual Flows) or :class:`Shift` (i-ResNet) in the density models;
:class:`Rescale` alone in the classifiers.

References:
    Theis, van den Oord, Bethge, "A note on the evaluation of generative models", ICLR 2016,
    https://arxiv.org/abs/1511.01844

    Ho, Chen, Srinivas, Duan, Abbeel, "Flow++: Improving flow-based generative models with
    variational dequantization and architecture design", ICML 2019, https://arxiv.org/abs/1902.00275

    Dinh, Sohl-Dickstein, Bengio, "Density estimation using Real NVP", ICLR 2017,
    https://arxiv.org/abs/1605.08803 (the logit transform)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.invertible import InvertibleLayer

__all__ = ["UniformDequantize", "VariationalDequantize", "Logit", "Shift", "Rescale", "bits_per_dim"]


def _event_size(x: Tensor) -> int:
    return math.prod(x.shape[1:])


def _checked_levels(levels: int) -> int:
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    return levels


def _floating(x: Tensor) -> Tensor:
    """``x``, integer images converted to the default floating dtype."""
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _checked_integers(name: str, x: Tensor, levels: int) -> Tensor:
    """``x`` as floats, checked to be a batch of integers in ``[0, levels - 1]``."""
    x = _floating(x)
    if x.dim() < 2:
        raise ValueError(f"{name} input: expected (batch, ...), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all() or (x != x.round()).any() or x.min() < 0 or x.max() > levels - 1:
        raise ValueError(
            f"{name} input: expected integers in [0, {levels - 1}], "
            f"got values in [{x.min().item():g}, {x.max().item():g}]"
            + ("" if torch.isfinite(x).all() and (x == x.round()).all() else " (not all integers)")
        )
    return x


class UniformDequantize(InvertibleLayer):
    r"""``x -> (x + u) / levels`` for integer-valued ``x`` in ``[0, levels - 1]``, with
    :math:`u \sim U[0, 1)` per dimension and log-det :math:`-D \log L`. The inverse rounds
    down: ``floor(y * levels)`` clamped to the valid levels."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.levels = _checked_levels(levels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = _checked_integers(type(self).__name__, x, self.levels)
        y = (x + torch.rand_like(x)) / self.levels
        logdet = x.new_full((x.shape[0],), -_event_size(x) * math.log(self.levels))
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        return torch.floor(y * self.levels).clamp_(0, self.levels - 1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


class VariationalDequantize(InvertibleLayer):
    r"""Variational dequantisation (Ho et al., Flow++, 2019): ``x -> (x + u) / levels`` for
    integer images ``x`` of ``shape`` ``(C, H, W)``, with the noise :math:`u \in (0, 1)^D` drawn
    from a learned conditional density :math:`q(u \mid x)` rather than uniformly.

    The noise is logit-normal: :math:`\epsilon \sim N(0, I)`,
    :math:`h = \mu(x) + e^{s(x)} \odot \epsilon`, :math:`u = \sigma(h)`, where :math:`\mu` and
    :math:`s` (``C`` channels each) come from a small network on the centred image
    :math:`x / L - 1/2` (3x3 convolution to ``hidden`` channels, ELU, 3x3 convolution to
    :math:`2C`). Its last convolution starts at zero, so that :math:`q` starts as the standard
    logit-normal. By the change of variables :math:`u = \sigma(h)`,

    .. math:: \log q(u \mid x) = \sum_i \log N(\epsilon_i; 0, 1) - \sum_i s_i(x)
              - \sum_i \log \sigma'(h_i), \qquad \sigma'(h) = \sigma(h)\,(1 - \sigma(h)),

    (:math:`\log \sigma' = \log\sigma(h) + \log\sigma(-h)`, computed stably), and the layer returns
    as its log-det

    .. math:: -D \log L - \log q(u \mid x),

    the log-det of :math:`x \mapsto (x + u) / L` at the drawn noise, less the noise's
    log-density. A :class:`~iresnet.flows.density.DensityModel` beginning with this layer then gives
    :math:`\log p(x + u) - \log q(u \mid x)` (on the integer scale), the variational lower bound on
    the discrete :math:`\log P(x)`: its expectation over :math:`q` is at most :math:`\log P(x)`,
    equal for :math:`q` the model's posterior over the cell :math:`x + [0, 1)^D`; with :math:`q`
    uniform it is :class:`UniformDequantize`'s bound. Training on it trains :math:`q` too (the
    noise is reparameterised). The inverse rounds down, ``floor(y * levels)``, clamped.

    References:
        Ho, Chen, Srinivas, Duan, Abbeel, "Flow++: Improving flow-based generative models with
        variational dequantization and architecture design", ICML 2019,
        https://arxiv.org/abs/1902.00275
    """

    def __init__(self, levels: int, shape: tuple[int, int, int], hidden: int = 16) -> None:
        super().__init__()
        self.levels = _checked_levels(levels)
        if len(shape) != 3 or any(not isinstance(n, int) or n < 1 for n in shape):
            raise ValueError(f"shape must be (C, H, W) of positive integers, got {shape!r}")
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        self.shape = tuple(shape)
        channels = shape[0]
        last = nn.Conv2d(hidden, 2 * channels, 3, padding=1)
        for parameter in last.parameters():  # q starts as the standard logit-normal
            nn.init.zeros_(parameter)
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ELU(), last)

    def _checked(self, x: Tensor) -> Tensor:
        x = _checked_integers(type(self).__name__, x, self.levels)
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{type(self).__name__} input: expected (batch, {self.shape}), got {tuple(x.shape)}")
        return x

    def noise_parameters(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`\mu(x)` and :math:`s(x)`, each of ``x``'s shape, for integer images ``x``."""
        mu, s = self.net(x / self.levels - 0.5).chunk(2, dim=1)
        return mu, s

    def log_q(self, u: Tensor, x: Tensor) -> Tensor:
        r""":math:`\log q(u \mid x)` per sample, for noise ``u`` in :math:`(0, 1)` of ``x``'s shape."""
        x = self._checked(x)
        mu, s = self.noise_parameters(x)
        h = torch.log(u) - torch.log1p(-u)
        return _logit_normal_log_density((h - mu) * torch.exp(-s), s, h)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self._checked(x)
        mu, s = self.noise_parameters(x)
        eps = torch.randn_like(x)
        h = mu + torch.exp(s) * eps
        u = torch.sigmoid(h)
        logdet = -_event_size(x) * math.log(self.levels) - _logit_normal_log_density(eps, s, h)
        return (x + u) / self.levels, logdet

    def inverse(self, y: Tensor) -> Tensor:
        return torch.floor(y * self.levels).clamp_(0, self.levels - 1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, shape={self.shape}"


def _logit_normal_log_density(eps: Tensor, s: Tensor, h: Tensor) -> Tensor:
    r""":math:`\log q(u)` per sample for :math:`u = \sigma(h)`, :math:`h = \mu + e^s \epsilon`."""
    log_normal = -0.5 * eps.square() - 0.5 * math.log(2 * math.pi)
    log_sigmoid_derivative = F.logsigmoid(h) + F.logsigmoid(-h)
    return (log_normal - s - log_sigmoid_derivative).flatten(1).sum(1)


class Logit(InvertibleLayer):
    r"""The logit transform :math:`y = \log s - \log(1 - s)`, :math:`s = \alpha + (1 - 2\alpha) x`,
    mapping :math:`[0, 1]` into :math:`\mathbb{R}`, with log-det
    :math:`\sum_i \log(1 - 2\alpha) - \log s_i - \log(1 - s_i)`."""

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError("Logit input: expected values in [0, 1]")
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log1p(-s)
        logdet = (math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Shift(InvertibleLayer):
    """``x -> x - 0.5`` (log-det 0): centres dequantised data on ``[-0.5, 0.5)``, the i-ResNet
    pre-processing where no logit transform is used."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x - 0.5, x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y + 0.5


class Rescale(InvertibleLayer):
    r"""Integer images with ``levels`` levels to ``[-0.5, 0.5]``: the affine map
    :math:`y = x / (L - 1) - 1/2`, with log-det :math:`-D \log(L - 1)`. Integer inputs become
    floats of the default dtype. The i-ResNet classifier's first step."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.levels = _checked_levels(levels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = _floating(x)
        logdet = x.new_full((x.shape[0],), -_event_size(x) * math.log(self.levels - 1))
        return x / (self.levels - 1) - 0.5, logdet

    def inverse(self, y: Tensor) -> Tensor:
        return (y + 0.5) * (self.levels - 1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


def bits_per_dim(log_prob: Tensor, event_size: int) -> Tensor:
    r"""Bits per dimension, :math:`-\log p / (D \ln 2)`, for log-densities in nats of
    dequantised data on the integer scale (a flow that begins with
    :class:`UniformDequantize`, whose log-det carries the :math:`\log_2 L` term)."""
    return -log_prob / (event_size * math.log(2))
