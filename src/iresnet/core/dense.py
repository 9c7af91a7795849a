r"""Dense layers of invertible DenseNets: the input concatenated with an activated output,
weighted so that the concatenation stays Lipschitz.

A dense layer maps :math:`x \mapsto [\eta_1 x, \eta_2 \phi(W x)]` (along dimension 1: features, or
the channels of an image). For two inputs,

.. math:: \|h(x) - h(y)\|^2 = \eta_1^2 \|x - y\|^2 + \eta_2^2 \|\phi(Wx) - \phi(Wy)\|^2
          \le (\eta_1^2 + \eta_2^2 L^2) \|x - y\|^2,

with :math:`L = \mathrm{Lip}(\phi \circ W)`, so :math:`\mathrm{Lip}(h) \le \sqrt{\eta_1^2 + \eta_2^2
L^2}`, at most 1 where :math:`\eta_1^2 + \eta_2^2 = 1` and :math:`L \le 1`. The paper learns the
weights: :math:`\hat\eta_i = \mathrm{softplus}(\kappa_i) + 0.1` (never zero, so that neither part
of the concatenation is switched off), normalised to :math:`\eta = c \, \hat\eta / \|\hat\eta\|`.
A chain of dense layers grows the width; a last normalised linear layer (or convolution) with
coefficient :math:`c` brings it back, and the branch is then :math:`c`-Lipschitz
(:func:`iresnet.models.branches.dense_branch`).

:func:`~iresnet.core.certificates.lipschitz_bound` certifies a dense layer by
:math:`\sqrt{\eta_1^2 + \eta_2^2 L^2}` with :math:`L` its network's certificate;
:func:`~iresnet.core.jacobian.linearize` takes it (the rule is registered here), so residual
blocks of dense branches use the explicit Jacobian products.

References:
    Perugachi-Diaz, Tomczak, Bhulai, "Invertible DenseNets with Concatenated LipSwish",
    NeurIPS 2021, https://arxiv.org/abs/2102.02694
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .jacobian import LayerJacobian, chain_factor_gradients, linearize, register_linearization

__all__ = ["DenseLayer", "ETA_FLOOR", "dense_weights"]

ETA_FLOOR = 0.1
"""The floor added to each weight's softplus before normalisation (the paper's)."""


class DenseLayer(nn.Module):
    r"""A dense layer :math:`x \mapsto [\eta_1 x, \eta_2 f(x)]`, concatenated along dimension 1,
    with :math:`f` = ``network`` (in i-DenseNets a normalised linear layer or convolution and an
    activation, :math:`\phi(W x)`) and learnable weights :math:`\eta_1, \eta_2 > 0`,
    :math:`\eta_1^2 + \eta_2^2 = c^2`. Then :math:`\mathrm{Lip} \le \sqrt{\eta_1^2 + \eta_2^2
    \mathrm{Lip}(f)^2} \le c \max(1, \mathrm{Lip}(f))` (see the module's docstring).

    Arguments:
        network: :math:`f`; it must keep the batch and every dimension after the first.
        coeff: :math:`c`, the norm of :math:`(\eta_1, \eta_2)`, in :math:`(0, 1]`.
        learnable: learn the weights (else they stay equal, :math:`c / \sqrt 2` each).

    References:
        Perugachi-Diaz, Tomczak, Bhulai, "Invertible DenseNets with Concatenated LipSwish",
        NeurIPS 2021, https://arxiv.org/abs/2102.02694

    Example:
        >>> layer = DenseLayer(nn.Sequential(spectral_norm(nn.Linear(3, 4)), LipSwish()))
        >>> layer(torch.randn(5, 3)).shape
        torch.Size([5, 7])
        >>> round(torch.linalg.vector_norm(layer.eta).item(), 6)
        1.0
    """

    def __init__(self, network: nn.Module, coeff: float = 1.0, *, learnable: bool = True) -> None:
        super().__init__()
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not 0 < coeff <= 1:
            raise ValueError(f"coeff must be a number in (0, 1], got {coeff!r}")
        self.network = network
        self.coeff = float(coeff)
        raw = torch.full((2,), math.log(math.expm1(1 - ETA_FLOOR)))  # softplus(raw) + floor = 1: equal weights
        if learnable:
            self.raw_eta = nn.Parameter(raw)
        else:
            self.register_buffer("raw_eta", raw)

    @property
    def eta(self) -> Tensor:
        r"""The weights :math:`(\eta_1, \eta_2)`, of norm ``coeff``."""
        return dense_weights(self.raw_eta, self.coeff)

    def forward(self, x: Tensor) -> Tensor:
        eta = self.eta
        return torch.cat([eta[0] * x, eta[1] * self.network(x)], dim=1)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff:g}, learnable={isinstance(self.raw_eta, nn.Parameter)}"


def dense_weights(raw_eta: Tensor, coeff: float) -> Tensor:
    r"""The weights :math:`\eta = c \, \hat\eta / \|\hat\eta\|`, :math:`\hat\eta =
    \mathrm{softplus}(\kappa) + 0.1`, from :math:`\kappa` = ``raw_eta``."""
    eta = F.softplus(raw_eta) + ETA_FLOOR
    return eta * (coeff / torch.linalg.vector_norm(eta))


class _DenseJacobian:
    r"""A dense layer's Jacobian at a point: :math:`J t = [\eta_1 t, \eta_2 J_f t]`,
    :math:`J^\top [u_1, u_2] = \eta_1 u_1 + \eta_2 J_f^\top u_2`, with :math:`J_f` the network's
    (a chain of layer Jacobians)."""

    def __init__(self, eta: Tensor, width: int, inner: list[LayerJacobian]) -> None:
        self.eta, self.width, self.inner = eta, width, inner

    def _inner_jvp(self, t: Tensor) -> Tensor:
        for layer in self.inner:
            t = layer.jvp(t)
        return t

    def jvp(self, t: Tensor) -> Tensor:
        return torch.cat([self.eta[0] * t, self.eta[1] * self._inner_jvp(t)], dim=1)

    def vjp(self, u: Tensor) -> Tensor:
        first, second = u[:, : self.width], u[:, self.width :]
        for layer in reversed(self.inner):
            second = layer.vjp(second)
        return self.eta[0] * first + self.eta[1] * second

    def cache_factors(self) -> None:
        for layer in self.inner:
            cache = getattr(layer, "cache_factors", None)
            if cache is not None:
                cache()

    def graph_tensors(self) -> list[Tensor]:
        return [self.eta, *(t for layer in self.inner for t in layer.graph_tensors())]

    def rebuilt(self, tensors: Iterator[Tensor]) -> _DenseJacobian:
        eta = next(tensors)
        return _DenseJacobian(eta, self.width, [layer.rebuilt(tensors) for layer in self.inner])

    def factor_gradients(self, r: Tensor, t: Tensor) -> list[Tensor | None]:
        # <r, J t> = eta_1 <r_1, t> + eta_2 <r_2, J_f t>
        first, second = r[:, : self.width], r[:, self.width :]
        eta_grad = torch.stack([(first * t).sum(), (second * self._inner_jvp(t)).sum()])
        return [eta_grad, *chain_factor_gradients(self.inner, self.eta[1] * second, t)]


def _dense_layer(layer: nn.Module, h: Tensor) -> tuple[Tensor, LayerJacobian | None]:
    assert isinstance(layer, DenseLayer)
    inner = linearize(layer.network, h, checked=True)  # the refusal check has looked inside (inner=)
    eta = layer.eta
    out = torch.cat([eta[0] * h, eta[1] * inner.output], dim=1)
    return out, _DenseJacobian(eta, h.shape[1], inner.layers)


def _network(layer: nn.Module) -> list[nn.Module]:
    assert isinstance(layer, DenseLayer)
    return [layer.network]


register_linearization(DenseLayer, _dense_layer, inner=_network)
