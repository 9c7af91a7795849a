r"""Almost-orthogonal Lipschitz (AOL) layers: a rescaling whose norm bound holds by construction.

For a weight :math:`W \in \mathbb{R}^{m \times n}` let :math:`P = W^\top W` and
:math:`D = \mathrm{diag}(d)` with

.. math:: d_i = \Big(\sum_j |P_{ij}|\Big)^{-1/2}.

Then :math:`\|W D\|_2 \le 1`. Proof: for any :math:`x`, with :math:`2ab \le a^2 + b^2`,

.. math::
    \|W D x\|^2 = \sum_{ij} d_i x_i P_{ij} d_j x_j
    \le \sum_{ij} |P_{ij}| \tfrac12 \big(d_i^2 x_i^2 + d_j^2 x_j^2\big)
    = \sum_i d_i^2 x_i^2 \sum_j |P_{ij}| = \|x\|^2,

using the symmetry of :math:`P`. Only :math:`d_i^2 \sum_j |P_{ij}| \le 1` is needed, so a smaller
:math:`d_i` keeps the bound. :class:`AOL` makes the weight :math:`c\, W D`: its norm is at most
:math:`c` at every call, in training and eval mode alike, with nothing to estimate or converge.

For a convolution with kernel :math:`K` (``c_out x c_in x kh x kw``) the same argument runs on
the convolution over the infinite grid :math:`\mathbb{Z}^2`, whose Gram operator is the
convolution with the kernel's correlation with itself,

.. math:: P_{ij}(t) = \sum_o \sum_p K_{oi}(p)\, K_{oj}(p + t),

a ``c_in x c_in x (2kh-1) x (2kw-1)`` kernel: an entry of the Gram matrix at input positions
:math:`(i, a), (j, b)` is :math:`P_{ij}(b - a)`, so its absolute row sum is
:math:`s_i = \sum_j \sum_t |P_{ij}(t)|` at every position and :math:`d_i = s_i^{-1/2}`, one scale
per input channel, bounds the operator's norm by 1 (Prach and Lampert's Theorem 2). A layer on a
finite map with zero padding, any stride and any dilation is that convolution restricted: the
input is embedded in :math:`\mathbb{Z}^2` by zeros (an isometry), dilation spreads the kernel
(its correlation has the same entries, at spread offsets, so the same :math:`s_i`), and stride
and the border keep a subset of the outputs (a projection). Each step has norm at most 1, so the
layer's norm is at most :math:`c`. Other padding modes copy input entries and are refused.

The row sums are computed in the weight's dtype with autocast off and plain matrix products (no
reduced-precision convolution), and inflated by a relative margin of a few units of rounding per
summed term, so that the rounding of the sums cannot lift the norm above :math:`c`.

AOL is loose: for a random weight the norm is often well below :math:`c` (it is tight where
:math:`W^\top W` is diagonal, an orthogonal :math:`W`), and the training learns weights for which
it is closer (the paper's "almost orthogonal").

References:
    Prach and Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz
    Networks", ECCV 2022, https://arxiv.org/abs/2208.03160
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .lipschitz import DEFAULT_COEFF, weight_parametrizations
from .validation import check_interval

__all__ = ["AOL", "aol", "aol_layers"]

_ROUNDING_MARGIN = 4.0
"""Units of rounding per summed term by which the row sums are inflated."""


class AOL(nn.Module):
    r"""Parametrization :math:`W \mapsto c\, W D`, :math:`D` the AOL rescaling of the input
    dimension (see the module's docstring): the operator norm is at most :math:`c` for every
    weight, in every mode.

    Arguments:
        layer: the ``nn.Linear`` or ``nn.Conv2d`` (``groups=1``, zero padding) whose weight is
            rescaled.
        coeff: the bound :math:`c` on the layer's operator norm, a finite number above 0.
    """

    def __init__(self, layer: nn.Linear | nn.Conv2d, coeff: float = DEFAULT_COEFF) -> None:
        super().__init__()
        check_interval("coeff", coeff, 0)
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
            raise ValueError(
                "aol supports Conv2d with groups=1 and padding_mode='zeros', got "
                f"groups={layer.groups}, padding_mode={layer.padding_mode!r}"
            )
        self.coeff = float(coeff)

    def forward(self, weight: Tensor) -> Tensor:
        with torch.autocast(weight.device.type, enabled=False):  # the scales in the weight's dtype
            scales = self.scales(weight)
            return weight * (self.coeff * scales).view(1, -1, *([1] * (weight.dim() - 2)))

    @staticmethod
    def scales(weight: Tensor) -> Tensor:
        r"""The rescaling :math:`d`, one entry per input feature or channel."""
        sums, terms = _gram_row_sums(weight)
        margin = 1 + _ROUNDING_MARGIN * terms * torch.finfo(weight.dtype).eps
        return torch.rsqrt(sums * margin + torch.finfo(weight.dtype).tiny)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"


def _gram_row_sums(weight: Tensor) -> tuple[Tensor, int]:
    r""":math:`s_i = \sum_j |P_{ij}|` for a dense weight, :math:`\sum_j \sum_t |P_{ij}(t)|` for a
    kernel (its correlation with itself, one offset :math:`t` at a time, each a matrix product
    over the overlap of the kernel and its shift), and the number of terms each :math:`s_i` sums."""
    if weight.dim() == 2:
        return (weight.T @ weight).abs().sum(1), weight.shape[0] + weight.shape[1]
    c_out, c_in, kh, kw = weight.shape
    sums = weight.new_zeros(c_in)
    for dy in range(1 - kh, kh):
        for dx in range(1 - kw, kw):
            here = weight[:, :, max(0, -dy) : kh - max(0, dy), max(0, -dx) : kw - max(0, dx)]
            shifted = weight[:, :, max(0, dy) : kh - max(0, -dy), max(0, dx) : kw - max(0, -dx)]
            left = here.transpose(0, 1).reshape(c_in, -1)
            right = shifted.transpose(0, 1).reshape(c_in, -1)
            sums = sums + (left @ right.T).abs().sum(1)
    return sums, c_out * kh * kw + c_in * (2 * kh - 1) * (2 * kw - 1)


def aol(module: nn.Linear | nn.Conv2d, coeff: float = DEFAULT_COEFF) -> nn.Linear | nn.Conv2d:
    r"""Constrain the operator norm of ``module`` to at most ``coeff`` by the AOL rescaling
    (:class:`AOL`): guaranteed at every call, with no power iteration, for a linear layer and for
    a zero-padded convolution at every input size, stride and dilation.

    The weight becomes a :mod:`torch.nn.utils.parametrize` parametrization, as with
    :func:`~iresnet.spectral_norm`; :func:`~iresnet.core.certificates.design_bound` reads its
    ``coeff`` and :func:`~iresnet.lipschitz_bound` certifies the weight as it is.

    Example:
        >>> layer = aol(nn.Linear(4, 6), coeff=0.9)
        >>> bool(torch.linalg.matrix_norm(layer.weight.double(), ord=2) <= 0.9)
        True
        >>> conv = aol(nn.Conv2d(2, 3, 3, stride=2, padding=1), coeff=0.9).double()
        >>> basis = torch.eye(2 * 5 * 5, dtype=torch.float64).view(-1, 2, 5, 5)
        >>> operator = conv(basis).flatten(1) - conv.bias.view(1, 3, 1, 1).expand(1, 3, 3, 3).flatten(1)
        >>> bool(torch.linalg.matrix_norm(operator, ord=2) <= 0.9)
        True
    """
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"aol takes nn.Linear or nn.Conv2d, got {type(module).__name__}")
    parametrize.register_parametrization(module, "weight", AOL(module, coeff), unsafe=True)
    return module


def aol_layers(model: nn.Module) -> Iterator[tuple[nn.Module, AOL]]:
    """Every layer of ``model`` with an :class:`AOL` on its weight, with that parametrization."""
    return weight_parametrizations(model, AOL)
