r"""A density model: an invertible map from data to latent and a Gaussian prior, handed out as
an :class:`iresnet.Flow` (a ``torch.distributions.Distribution``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

from ..core.invertible import layer_shape
from .distributions import Flow, as_transform

__all__ = ["DensityModel"]


class DensityModel(nn.Module):
    r"""A normalizing flow as a module: ``transform`` maps data to latent
    (``z, logdet = transform(x)``) and the prior is :math:`N(\mu, \mathrm{diag}(\sigma^2))` on the
    latent, standard or learned (the i-ResNet paper learns it).

    ``model()`` returns the :class:`~iresnet.Flow`; ``model(x)`` is ``model().log_prob(x)``, the
    log-likelihood per example in nats, so that ``DistributedDataParallel(model)`` wraps the
    whole computation.

    With ``class_means`` (one row per class, each of the latent's shape) the prior is instead the
    uniform mixture of :math:`N(\mu_k, I)`, one component per class (FlowGMM: Izmailov et al.,
    "Semi-Supervised Learning with Normalizing Flows", ICML 2020, https://arxiv.org/abs/1912.13025):
    :meth:`class_log_probs` gives :math:`\log p(z \mid y = k)`, from which :math:`p(y \mid x)`
    follows by Bayes' rule.

    Arguments:
        transform: an invertible module from data to latent (``forward_shape`` where the shape
            changes).
        event_shape: the shape of one data point.
        learned_prior: learn the prior's mean and log standard deviation.
        class_means: the fixed means of a class-conditional mixture prior, ``(classes, *latent)``.
    """

    class_means: Tensor | None
    prior_loc: Tensor
    prior_log_scale: Tensor

    def __init__(
        self,
        transform: nn.Module,
        event_shape: tuple[int, ...],
        *,
        learned_prior: bool = False,
        class_means: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.event_shape = tuple(event_shape)
        self.latent_shape = tuple(layer_shape(transform, "forward_shape", self.event_shape))
        if class_means is not None:
            if learned_prior:
                raise ValueError("a class-conditional mixture prior has fixed means: learned_prior must be False")
            if tuple(class_means.shape[1:]) != self.latent_shape:
                raise ValueError(
                    f"class_means must have shape (classes, *{self.latent_shape}), got {class_means.shape}"
                )
        self.register_buffer("class_means", class_means)
        loc, log_scale = torch.zeros(self.latent_shape), torch.zeros(self.latent_shape)
        if learned_prior:
            self.prior_loc, self.prior_log_scale = nn.Parameter(loc), nn.Parameter(log_scale)
        else:
            self.register_buffer("prior_loc", loc)
            self.register_buffer("prior_log_scale", log_scale)

    @property
    def event_size(self) -> int:
        """:math:`D`, the number of dimensions of one data point."""
        return math.prod(self.event_shape)

    def prior(self, temperature: float = 1.0) -> Distribution:
        r"""The latent's distribution: the diagonal Gaussian, or the class-conditional mixture;
        ``temperature`` :math:`T` multiplies every standard deviation, :math:`N(\mu, (T \sigma)^2)`
        (each component :math:`N(\mu_k, T^2 I)` of the mixture)."""
        scale = check_temperature(temperature)
        if self.class_means is not None:
            components = self.class_means.new_zeros(len(self.class_means))
            return MixtureSameFamily(Categorical(logits=components), self._class_conditionals(self.class_means, scale))
        return Independent(Normal(self.prior_loc, scale * self.prior_log_scale.exp()), len(self.latent_shape))

    def _class_conditionals(self, means: Tensor, scale: float = 1.0) -> Independent:
        return Independent(Normal(means, torch.full_like(means, scale)), len(self.latent_shape))

    def class_log_probs(self, z: Tensor) -> Tensor:
        r""":math:`\log N(z; \mu_k, I)` for every class ``k``: ``(batch, classes)``."""
        if self.class_means is None:
            raise ValueError("class_log_probs needs a class-conditional prior (class_means)")
        return self._class_conditionals(self.class_means).log_prob(z.unsqueeze(1))

    def flow(self, temperature: float = 1.0) -> Flow:
        """The :class:`~iresnet.Flow` of the transform and :meth:`prior` at ``temperature``."""
        return Flow(as_transform(self.transform, len(self.event_shape)), self.prior(temperature))

    def forward(self, x: Tensor | None = None) -> Flow | Tensor:
        """The :class:`~iresnet.Flow` without argument; :math:`\\log p(x)` per example with one."""
        return self.flow() if x is None else self.flow().log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None, *, temperature: float = 1.0) -> Tensor:
        r"""``n`` draws by inverting the transform (in eval mode, where every spectral norm is
        converged for its weights before use; in training mode the inverse is that of the
        training-mode function as it stands); with ``labels`` (``n`` classes, for a
        class-conditional prior), draws of :math:`p(x \mid y)`.

        ``temperature`` :math:`T > 0` draws the latent from :meth:`prior` with its scale times
        :math:`T`, :math:`z = \mu + T \sigma \varepsilon` (:math:`z = \mu_y + T \varepsilon`
        given labels), then :math:`x = f^{-1}(z)`: :math:`T < 1` gives typical, smoother samples,
        :math:`T = 1` draws of the model itself. ``ValueError`` for :math:`T \le 0`."""
        scale = check_temperature(temperature)
        if labels is None:
            return self.flow(temperature).sample((n,))
        if self.class_means is None:
            raise ValueError("sampling given labels needs a class-conditional prior (class_means)")
        if labels.shape != (n,):
            raise ValueError(f"labels must hold one class per sample, shape ({n},), got {tuple(labels.shape)}")
        means = self.class_means[labels.to(self.class_means.device)]
        return self.flow().transform.inv(means + scale * torch.randn_like(means))


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float; ``ValueError`` unless it is a finite number above 0."""
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"the temperature must be a finite number > 0, got {temperature!r}")
    return value
