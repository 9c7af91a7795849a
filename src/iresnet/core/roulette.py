r"""The Russian-roulette estimator of the log-determinant, :class:`Roulette`: the power series
of :mod:`iresnet.core.series` with a random number of terms, each reweighted by the probability
that it is reached, so that the estimate is unbiased.

References:
    Chen et al., "Residual Flows for Invertible Generative Modeling", NeurIPS 2019,
    https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch._higher_order_ops import while_loop

from .jacobian import Linearization
from .series import SeriesEstimator
from .validation import check_choice, check_count, check_interval

__all__ = ["Roulette"]


class Roulette(SeriesEstimator):
    r"""The Residual Flows estimator, unbiased: the first ``n_exact_terms`` terms always, then
    a random number ``N`` more, term ``n_exact_terms + m`` weighted by ``1 / P(N >= m)``.

    ``N`` is geometric on ``{1, 2, ...}`` with success probability ``p``
    (:math:`P(N \ge m) = (1-p)^{m-1}`, mean ``1/p``) or Poisson with mean ``rate``.

    Arguments:
        n_exact_terms: terms computed on every call.
        distribution: ``"geometric"`` or ``"poisson"``.
        p: the geometric distribution's success probability.
        rate: the Poisson distribution's mean.
        n_probes: Hutchinson probes (each with its own draw of ``N``).
        probe: ``"gaussian"``, ``"rademacher"`` or ``"basis"`` (exact traces, ``d`` passes).
        memory_efficient: Neumann-series gradient computed in the forward pass.

    Example:
        Unbiased: the mean of many draws is the exact log-det. For :math:`g(x) = W x` with basis
        probes only ``N`` is random; each of the 1,000 probes draws its own. The mean is
        :math:`\log|\det(I + W)| = \log(1.2 \cdot 0.7) = -0.1744` within its standard error
        (about 3e-4), where the first term alone would give :math:`\mathrm{tr}(W) = -0.1`:

        >>> g = nn.Linear(2, 2, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = g.weight.copy_(torch.tensor([[0.2, 0.1], [0.0, -0.3]]))
        >>> estimator = Roulette(n_exact_terms=1, p=0.5, n_probes=1000, probe="basis")
        >>> _, logdet = ResidualBlock(g, estimator)(torch.zeros(1, 2, dtype=torch.float64))
        >>> abs(logdet.item() - torch.tensor(1.2 * 0.7).log().item()) < 3e-3
        True
    """

    def __init__(
        self,
        n_exact_terms: int = 2,
        distribution: str = "geometric",
        p: float = 0.5,
        rate: float = 2.0,
        n_probes: int = 1,
        probe: str = "gaussian",
        memory_efficient: bool = False,
    ) -> None:
        super().__init__(n_probes, probe, memory_efficient)
        check_count("n_exact_terms", n_exact_terms, 0)
        check_choice("distribution", distribution, ("geometric", "poisson"))
        check_interval("p", p, 0, 1)
        check_interval("rate", rate, 0)
        self.n_exact_terms = n_exact_terms
        self.distribution = distribution
        self.p = p
        self.rate = rate

    def draw_tail_length(self) -> int:
        """A draw of ``N`` from torch's generator (so ``torch.manual_seed`` fixes it)."""
        if self.distribution == "geometric":
            return int(torch.empty(()).geometric_(self.p))
        return int(torch.poisson(torch.tensor(float(self.rate))))

    def survival(self, m: int) -> float:
        """:math:`P(N \\ge m)` for ``m >= 1``."""
        return self.survival_tensor(torch.tensor(float(m), dtype=torch.float64)).item()

    def survival_tensor(self, m: Tensor) -> Tensor:
        """:math:`P(N \\ge m)` elementwise, for ``m >= 1``: :math:`(1 - p)^{m-1}`, or for the Poisson
        distribution the regularised lower incomplete gamma function :math:`P(m, \\lambda)`, which
        keeps its relative precision where :math:`1 - P(N < m)` would cancel to nothing."""
        if self.distribution == "geometric":
            return torch.exp((m - 1) * math.log1p(-self.p))
        return torch.special.gammainc(m, torch.tensor(self.rate, dtype=m.dtype, device=m.device))

    def _device_tail_length(self, like: Tensor) -> Tensor:
        """A draw of ``N`` as a 0-d integer tensor on ``like``'s device, without a host sync:
        geometric by inversion, :math:`N = \\lfloor \\log V / \\log(1 - p) \\rfloor + 1` with
        :math:`V` uniform on :math:`(0, 1]`. In float64 whatever ``like``'s dtype: a float32 uniform
        would cap ``N`` near 25 (its smallest step is :math:`2^{-24}`), truncating the series."""
        if self.distribution == "geometric":
            v = 1 - torch.rand((), dtype=torch.float64, device=like.device)
            return (torch.log(v) / math.log1p(-self.p)).floor().long() + 1
        return torch.poisson(torch.full((), self.rate, dtype=torch.float64, device=like.device)).long()

    def device_series(
        self, products: Linearization, v: Tensor, neumann: bool, tail_length: Tensor, cayley: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The sums of :meth:`SeriesEstimator.from_products` for one probe with the tail length drawn on
        the device (:meth:`draw`) and the terms in a ``while_loop``: one compiled graph serves
        every draw, with no host sync. Only for a series without a graph (the Neumann path, or no
        gradient). The weights are computed in float64."""
        n_terms = self.n_exact_terms + tail_length
        products.cache_factors()  # the loop's body must not change Python state

        def more_terms(k: Tensor, u: Tensor, series: Tensor, *neumann_vector: Tensor) -> Tensor:
            return k <= n_terms

        def term(k: Tensor, u: Tensor, series: Tensor, *neumann_vector: Tensor) -> tuple[Tensor, ...]:
            m = (k - self.n_exact_terms).double()
            weight = torch.where(m >= 1, 1 / self.survival_tensor(m.clamp(min=1)), 1.0)
            odd = k % 2 == 1
            if cayley:  # the odd terms only, times -2 (series.term_scale)
                signed = torch.where(odd, -2 * weight, torch.zeros_like(weight)).to(v.dtype)
            else:
                signed = torch.where(odd, weight, -weight).to(v.dtype)
            neumann_vector = tuple(w + signed * u for w in neumann_vector)
            u = products.vjp(u)
            return k + 1, u, series + signed / k * u, *neumann_vector

        # the Neumann vector is carried only when wanted: a carry returned unchanged would alias
        start: tuple[Tensor, ...] = (torch.ones((), dtype=torch.long, device=v.device), v.clone(), torch.zeros_like(v))
        if neumann:
            start += (torch.zeros_like(v),)
        _, _, series, *neumann_vector = while_loop(more_terms, term, start)
        return series, neumann_vector[0] if neumann else torch.zeros_like(v)

    def term_weights(self) -> list[float]:
        tail = self.draw_tail_length()
        return [1.0] * self.n_exact_terms + [1.0 / self.survival(m) for m in range(1, tail + 1)]

    def draw(self, like: Tensor, graph_free: bool = False) -> Sequence[Sequence[float] | Sequence[Tensor] | Tensor]:
        """Each probe's term weights. Under ``torch.compile``, for a series computed
        without a graph (``graph_free``), each sample's tail length as a 0-d tensor drawn on the
        device, in the graph (:meth:`device_series` sums the terms). Otherwise the weights are
        drawn outside the graph, as tensors, with each tail padded with zero weights to the next
        power of two, so that one compiled graph serves every draw of its bucket instead of one
        graph per draw. Terms of weight zero add nothing: the estimate stays unbiased, unlike a
        cap on the number of terms."""
        if not torch.compiler.is_compiling():
            return super().draw(like)
        if graph_free:
            return [self._device_tail_length(like) for _ in range(self.n_probes)]
        return self._bucketed_draw(like)

    @torch.compiler.disable
    def _bucketed_draw(self, like: Tensor) -> tuple[tuple[Tensor, ...], ...]:
        """The host's draws, each padded to its bucket (see :meth:`draw`)."""
        draws = []
        for _ in range(self.n_probes):  # the host's draws: those of SeriesEstimator.draw
            weights = self.term_weights()
            tail = len(weights) - self.n_exact_terms
            padded_tail = 0 if tail == 0 else 1 << (tail - 1).bit_length()
            padded = torch.tensor(weights + [0.0] * (padded_tail - tail), dtype=like.dtype, device=like.device)
            draws.append(padded.unbind())
        return tuple(draws)

    def __repr__(self) -> str:
        tail = f"p={self.p}" if self.distribution == "geometric" else f"rate={self.rate}"
        return (
            f"Roulette(n_exact_terms={self.n_exact_terms}, distribution={self.distribution!r}, "
            f"{tail}, n_probes={self.n_probes}, probe={self.probe!r}, "
            f"memory_efficient={self.memory_efficient})"
        )
