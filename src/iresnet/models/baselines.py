r"""Two baseline density models for integer images, to show how much a trained flow gains.

Both score an image the way a flow that begins with
:class:`~iresnet.data.UniformDequantize` does (see :mod:`iresnet.data.preprocess`): the
log-density in nats of the dequantised image :math:`x + u`, :math:`u \sim U[0, 1)^D`, on the
integer scale :math:`[0, L)^D`. So :func:`iresnet.data.bits_per_dim` turns either's
``log_prob`` into bits/dim comparable with the flow's, and the uniform density on
:math:`[0, L)^D`, :math:`\log p = -D \log L`, i.e. :math:`\log_2 L` bits/dim, is the score to
beat.

- :class:`IndependentPixels`: a categorical distribution per pixel (Laplace smoothing).
- :class:`FullCovarianceGaussian`: one Gaussian with full covariance fitted to :math:`x + u`
  (the Ledoit--Wolf shrunk covariance of :math:`x` plus the exact moments of :math:`u`).

Input images are tensors ``(N, *event_shape)`` (``(N, C, H, W)`` for images) of integers,
any dtype, as :func:`iresnet.data.load_images` returns them. Every result is float64.

>>> import torch
>>> images = torch.tensor([[[[0, 2]]], [[[0, 1]]]])  # two 1 x 1 x 2 images, levels 0..2
>>> pixels = IndependentPixels(levels=3).fit(images)
>>> pixels.probs[0, 0, 0]  # pixel (0, 0, 0): counts (2, 0, 0), plus one each, over 2 + 3
tensor([0.6000, 0.2000, 0.2000], dtype=torch.float64)
>>> pixels.log_prob(images).exp()  # 3/5 * 2/5 for both
tensor([0.2400, 0.2400], dtype=torch.float64)
>>> gaussian = FullCovarianceGaussian().fit(images)
>>> gaussian.mean  # mean(x) + 1/2
tensor([0.5000, 2.0000], dtype=torch.float64)
>>> gaussian.delta  # no shrinkage: x_n x_n^T - S = 0 for both centred images
0.0
>>> gaussian.covariance  # Cov(x) + I/12: pixel 0 never varies, pixel 1 has variance 1/4
tensor([[0.0833, 0.0000],
        [0.0000, 0.3333]], dtype=torch.float64)
>>> generator = torch.Generator().manual_seed(0)
>>> gaussian.log_prob(images, generator=generator).shape
torch.Size([2])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal

__all__ = ["FullCovarianceGaussian", "IndependentPixels"]


def _check_images(
    images: Tensor, who: str, *, levels: int | None = None, event_shape: tuple[int, ...] | None = None
) -> None:
    """Raise ``ValueError`` unless ``images`` is ``(N, *event_shape)``, ``N >= 1``, of integers
    in ``[0, levels - 1]`` (or ``>= 0`` where ``levels`` is ``None``)."""
    if not isinstance(images, Tensor):
        raise ValueError(f"{who}: expected a tensor of images, got {type(images).__name__}")
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"{who}: expected a non-empty batch (N, C, H, W), got shape {tuple(images.shape)}")
    if event_shape is not None and tuple(images.shape[1:]) != event_shape:
        raise ValueError(
            f"{who}: expected images of shape (N, {', '.join(map(str, event_shape))}) as in fit, "
            f"got {tuple(images.shape)}"
        )
    if images.dtype == torch.bool or images.is_complex():
        raise ValueError(f"{who}: expected integer pixel values, got dtype {images.dtype}")
    if images.is_floating_point() and not (torch.isfinite(images).all() and (images == images.round()).all()):
        raise ValueError(f"{who}: expected integer pixel values, got non-integers (dtype {images.dtype})")
    low, high = images.min().item(), images.max().item()
    top = "" if levels is None else f", {levels - 1}"
    if low < 0 or (levels is not None and high > levels - 1):
        raise ValueError(f"{who}: expected integers in [0{top}], got values in [{low:g}, {high:g}]")


class IndependentPixels:
    r"""Independent categorical pixels: pixel :math:`d` takes level :math:`k` with probability

    .. math:: P_d(k) = \frac{n_{d,k} + \alpha}{N + \alpha L},

    :math:`n_{d,k}` the number of training images whose pixel :math:`d` equals :math:`k`,
    :math:`\alpha` the pseudo-count (1: Laplace's add-one smoothing, so that no level has
    probability 0). As a density of the dequantised image, a categorical on the integers is
    piecewise constant, :math:`P_d(k)` on :math:`[k, k + 1)`, so
    :math:`\log p(x + u) = \sum_d \log P_d(x_d)` for every :math:`u \in [0, 1)^D`: the
    dequantised log-density equals the discrete log-likelihood, with no noise and no gap.

    Arguments:
        levels: the number of intensity levels :math:`L` (values ``0 .. levels - 1``).
        pseudocount: :math:`\alpha > 0`.
        batch_size: images processed at a time (bounds the memory, not the result).
    """

    def __init__(self, levels: int, *, pseudocount: float = 1.0, batch_size: int = 4096) -> None:
        if levels < 2:
            raise ValueError(f"levels must be at least 2, got {levels}")
        if not pseudocount > 0:
            raise ValueError(f"pseudocount must be positive, got {pseudocount}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.levels, self.pseudocount, self.batch_size = levels, pseudocount, batch_size
        self.event_shape: tuple[int, ...] | None = None
        self.log_probs: Tensor | None = None  # (D, L), float64

    def fit(self, images: Tensor) -> IndependentPixels:
        """Count the levels of every pixel over ``images`` ``(N, *event_shape)``; returns ``self``."""
        _check_images(images, "IndependentPixels.fit", levels=self.levels)
        size = math.prod(images.shape[1:])
        offsets = torch.arange(size, device=images.device) * self.levels
        counts = torch.zeros(size * self.levels, dtype=torch.float64, device=images.device)
        for chunk in images.split(self.batch_size):
            cells = offsets + chunk.reshape(len(chunk), size).long()  # index d * L + x_d
            counts += torch.bincount(cells.flatten(), minlength=size * self.levels).double()
        smoothed = counts.view(size, self.levels) + self.pseudocount
        self.log_probs = smoothed.log() - math.log(len(images) + self.pseudocount * self.levels)
        self.event_shape = tuple(images.shape[1:])
        return self

    def _fitted(self) -> tuple[Tensor, tuple[int, ...]]:
        """The table of log-probabilities and the event shape it was fitted to."""
        if self.log_probs is None or self.event_shape is None:
            raise RuntimeError("IndependentPixels is not fitted: call fit(images) first")
        return self.log_probs, self.event_shape

    @property
    def probs(self) -> Tensor:
        """:math:`P_d(k)`, shape ``(*event_shape, levels)``; sums to 1 over the last axis."""
        table, event_shape = self._fitted()
        return table.exp().view(*event_shape, self.levels)

    def log_prob(self, images: Tensor) -> Tensor:
        r""":math:`\sum_d \log P_d(x_d)` in nats, shape ``(N,)``: both the discrete
        log-likelihood and the log-density of :math:`x + u` for any :math:`u \in [0, 1)^D`."""
        table, event_shape = self._fitted()
        _check_images(images, "IndependentPixels.log_prob", levels=self.levels, event_shape=event_shape)
        table = table.to(images.device).flatten()
        size = math.prod(event_shape)
        offsets = torch.arange(size, device=images.device) * self.levels
        pieces = [
            table[offsets + chunk.reshape(len(chunk), size).long()].sum(1) for chunk in images.split(self.batch_size)
        ]
        return torch.cat(pieces)


class FullCovarianceGaussian:
    r"""A Gaussian :math:`N(\mu, \Sigma)` on :math:`\mathbb{R}^D` for the dequantised images
    :math:`y = x + u`, :math:`u \sim U[0, 1)^D` independent of :math:`x`, fitted from the
    integer training images :math:`x_1, \dots, x_N` and the exact moments of the noise:

    .. math:: \mu = \bar x + \tfrac12 \mathbf 1, \qquad
              \Sigma = \frac1N \sum_n (x_n - \bar x)(x_n - \bar x)^\top + \tfrac1{12} I,
              \qquad \bar x = \frac1N \sum_n x_n.

    *Derivation.* Maximum likelihood on one draw of noise per image,
    :math:`y_n = x_n + u_n`, would give the sample mean and covariance of the :math:`y_n`; that
    covariance has rank at most :math:`N - 1`, so for :math:`N \le D` it is singular, and the
    directions it misses (those the :math:`N` images do not span) would get no variance at all.
    The noise is known, so it need not be sampled: take instead the Gaussian that maximises the
    *expected* log-likelihood over :math:`u_1, \dots, u_N`. With
    :math:`e_n = x_n + \tfrac12 \mathbf 1 - \mu` and :math:`\mathbb E[u] = \tfrac12 \mathbf 1`,
    :math:`\operatorname{Cov}[u] = \tfrac1{12} I` (each coordinate is uniform on an interval of
    length 1),

    .. math:: \mathbb E_u\big[(x_n + u_n - \mu)(x_n + u_n - \mu)^\top\big]
              = e_n e_n^\top + \tfrac1{12} I,

    so the expected log-likelihood is

    .. math:: -\frac N2 \Big[\log\det(2\pi\Sigma)
              + \operatorname{tr}\Big(\Sigma^{-1} \Big(\frac1N \sum_n e_n e_n^\top
              + \tfrac1{12} I\Big)\Big)\Big],

    the Gaussian log-likelihood of a sample with second moment :math:`\frac1N \sum_n e_n
    e_n^\top + \frac1{12} I` about :math:`\mu`. It is maximised at the :math:`\mu` and
    :math:`\Sigma` above: :math:`\mu` makes :math:`\sum_n e_n = 0`, and :math:`\Sigma` is that
    second moment. :math:`\Sigma \succeq \tfrac1{12} I`, so it is positive definite whatever
    :math:`N` and :math:`D` (no ridge is needed), and it is exactly the covariance of :math:`x + u`
    for :math:`x` drawn from the training images: in a direction they do not span,
    :math:`x + u` varies only by the noise, variance :math:`\tfrac1{12}`, and the fit keeps
    its meaning for :math:`N \le D`.

    The score of an image is the log-density of a fresh :math:`x + u`,

    .. math:: \log p(x + u) = -\tfrac12 \left[(x + u - \mu)^\top \Sigma^{-1} (x + u - \mu)
              + \log \det (2 \pi \Sigma)\right],

    whose mean over :math:`u` lower-bounds the log-probability of :math:`x` under the Gaussian
    discretised to unit cells, as for a flow. The Gaussian puts some mass outside
    :math:`[0, L)^D`, which only lowers its score. Computed in float64; the moments of
    :math:`x` are accumulated over chunks of images, about the first chunk's mean, for accuracy.

    *Shrinkage* (the default). :math:`\operatorname{Cov}(x)` above is the sample covariance
    :math:`S`; with fewer images than dimensions it has rank :math:`< N` and underestimates the
    variance in every direction the training images do not span, where test images still vary
    (the noise's :math:`\tfrac1{12}` is far too little for real photos). So :math:`S` is
    replaced by the Ledoit--Wolf estimator (O. Ledoit and M. Wolf, "A well-conditioned
    estimator for large-dimensional covariance matrices", J. Multivariate Analysis 88 (2004),
    365--411), the convex combination with a scaled identity closest to the true covariance in
    expected Frobenius loss, with the weight estimated from the data, no tuning:

    .. math:: \Sigma_x = \delta\, m I + (1 - \delta) S, \qquad
              m = \frac{\operatorname{tr} S}{D}, \qquad
              \delta = \frac{b^2}{d^2}, \qquad d^2 = \lVert S - m I \rVert_F^2,

    .. math:: b^2 = \min\Big(d^2, \frac1{N^2} \sum_n \lVert x_n x_n^\top - S \rVert_F^2\Big)
              = \min\Big(d^2, \frac1{N^2} \Big(\sum_n \lVert x_n \rVert^4
              - N \lVert S \rVert_F^2\Big)\Big),

    :math:`x_n` centred, :math:`S = \frac1N \sum_n x_n x_n^\top` (the paper's norm divides
    both squares by :math:`D`, which cancels in :math:`\delta`). The identity on the right
    expands the square, with :math:`\sum_n \langle x_n x_n^\top, S \rangle_F = N \lVert S
    \rVert_F^2`, and needs no :math:`D \times D` matrix per image: :meth:`fit` makes a second
    pass for :math:`\sum_n \lVert x_n - \bar x \rVert^4`. :math:`\delta \in [0, 1]` (0 where
    :math:`d^2 = 0`, :math:`S` already a multiple of :math:`I`) is kept as :attr:`delta`; it
    tends to 0 as :math:`N / D` grows. Then :math:`\Sigma = \Sigma_x + \tfrac1{12} I` as
    above. With ``shrinkage=False``, :math:`\Sigma_x = S` and :attr:`delta` is 0.

    In :meth:`log_prob`, ``u`` is drawn as ``torch.rand(chunk.shape, generator=generator,
    dtype=torch.float64)`` for each chunk of ``batch_size`` consecutive images, in order (one
    draw when ``N <= batch_size``); :meth:`fit` draws nothing.

    Arguments:
        shrinkage: shrink :math:`\operatorname{Cov}(x)` toward :math:`m I` (Ledoit--Wolf).
        batch_size: images processed at a time (bounds the memory, not the result).
    """

    def __init__(self, *, shrinkage: bool = True, batch_size: int = 4096) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.shrinkage, self.batch_size = shrinkage, batch_size
        self.delta: float | None = None  # the Ledoit-Wolf shrinkage weight, after fit
        self.event_shape: tuple[int, ...] | None = None
        self.mean: Tensor | None = None  # (D,)
        self.covariance: Tensor | None = None  # (D, D)
        self.scale_tril: Tensor | None = None  # Cholesky factor of the covariance

    def _dequantised(self, chunk: Tensor, generator: torch.Generator | None) -> Tensor:
        noise = torch.rand(chunk.shape, generator=generator, dtype=torch.float64, device=chunk.device)
        return (chunk.double() + noise).flatten(1)

    def fit(self, images: Tensor) -> FullCovarianceGaussian:
        """Fit :math:`\\mu = \\bar x + 1/2` and :math:`\\Sigma = \\Sigma_x + I/12` to ``images``
        ``(N, *event_shape)``, :math:`\\Sigma_x` the Ledoit--Wolf estimate (or
        :math:`\\operatorname{Cov}(x)` with ``shrinkage=False``); returns ``self``.
        Deterministic: no noise is drawn."""
        _check_images(images, "FullCovarianceGaussian.fit")
        size = math.prod(images.shape[1:])
        total = torch.zeros(size, dtype=torch.float64, device=images.device)
        scatter = torch.zeros(size, size, dtype=torch.float64, device=images.device)
        shift: Tensor | None = None
        for chunk in images.split(self.batch_size):
            points = chunk.double().flatten(1)
            if shift is None:  # sums around a first estimate of the mean, for accuracy
                shift = points.mean(0)
            centred = points - shift
            total += centred.sum(0)
            scatter += centred.T @ centred
        if shift is None:  # _check_images refuses an empty batch
            raise ValueError("FullCovarianceGaussian.fit: no images to fit")
        offset = total / len(images)
        covariance = scatter / len(images) - torch.outer(offset, offset)
        covariance = (covariance + covariance.T) / 2
        delta = 0.0
        if self.shrinkage:
            covariance, delta = self._shrink(images, shift + offset, covariance)
        noise = torch.eye(size, dtype=torch.float64, device=images.device) / 12  # Cov[u]
        covariance = covariance + noise
        try:
            scale_tril = torch.linalg.cholesky(covariance)
        except torch.linalg.LinAlgError as error:  # only by rounding: Cov(x) + I/12 >= I/12
            raise ValueError("FullCovarianceGaussian.fit: the covariance is not positive definite") from error
        self.mean, self.covariance, self.scale_tril = shift + offset + 0.5, covariance, scale_tril
        self.delta, self.event_shape = delta, tuple(images.shape[1:])
        return self

    def _shrink(self, images: Tensor, mean: Tensor, sample: Tensor) -> tuple[Tensor, float]:
        """The Ledoit--Wolf estimate :math:`\\delta m I + (1 - \\delta) S` from the sample
        covariance ``sample`` :math:`S` of ``images`` about ``mean``, and :math:`\\delta`."""
        count, size = len(images), len(mean)
        fourth = torch.zeros((), dtype=torch.float64, device=images.device)  # sum_n |x_n - mean|^4
        for chunk in images.split(self.batch_size):
            fourth += (chunk.double().flatten(1) - mean).square().sum(1).square().sum()
        scale = sample.diagonal().sum() / size  # m = tr(S) / D
        target = scale * torch.eye(size, dtype=torch.float64, device=images.device)
        distance = (sample - target).square().sum()  # d^2 = |S - m I|_F^2
        # (1 / N^2) sum_n |x_n x_n^T - S|_F^2, >= 0 but for rounding
        spread = ((fourth - count * sample.square().sum()) / count**2).clamp(min=0)
        delta = 0.0 if distance.item() == 0 else min(1.0, (torch.minimum(spread, distance) / distance).item())
        return delta * target + (1 - delta) * sample, delta

    def _fitted(self, device: torch.device) -> tuple[MultivariateNormal, tuple[int, ...]]:
        """The Gaussian on ``device`` and the event shape it was fitted to."""
        if self.mean is None or self.scale_tril is None or self.event_shape is None:
            raise RuntimeError("FullCovarianceGaussian is not fitted: call fit(images) first")
        return MultivariateNormal(self.mean.to(device), scale_tril=self.scale_tril.to(device)), self.event_shape

    def log_density(self, points: Tensor) -> Tensor:
        """The Gaussian log-density in nats of real-valued ``points`` ``(N, *event_shape)``
        (already dequantised, on the integer scale), shape ``(N,)``."""
        distribution, event_shape = self._fitted(points.device)
        if points.dim() < 2 or tuple(points.shape[1:]) != event_shape:
            raise ValueError(
                f"FullCovarianceGaussian.log_density: expected shape (N, {', '.join(map(str, event_shape))}), "
                f"got {tuple(points.shape)}"
            )
        if not torch.isfinite(points).all():
            raise ValueError("FullCovarianceGaussian.log_density: points hold NaN or inf")
        return torch.cat([distribution.log_prob(chunk.double().flatten(1)) for chunk in points.split(self.batch_size)])

    def log_prob(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """:math:`\\log p(x + u)` in nats for integer ``images`` ``(N, *event_shape)`` and fresh
        uniform noise :math:`u` drawn with ``generator``, shape ``(N,)``."""
        distribution, event_shape = self._fitted(images.device)
        _check_images(images, "FullCovarianceGaussian.log_prob", event_shape=event_shape)
        return torch.cat(
            [distribution.log_prob(self._dequantised(chunk, generator)) for chunk in images.split(self.batch_size)]
        )
