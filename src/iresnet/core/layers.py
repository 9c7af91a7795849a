r"""The elementary invertible layers: :class:`ActNorm` (with :func:`initialize_from_data`),
:class:`Squeeze` and :class:`InjectivePad`."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .invertible import InvertibleLayer
from .validation import check_count, check_input, check_interval

__all__ = ["ActNorm", "Squeeze", "InjectivePad", "initialize_from_data"]


class ActNorm(InvertibleLayer):
    r"""Per-channel affine map :math:`y = (x + b) \odot e^{s}` on dimension 1, initialised from
    the first training batch to zero mean and unit variance per channel (across processes
    under ``torch.distributed``): :math:`b = -\mu`, :math:`s = -\frac12 \log(\sigma^2 + \epsilon)`,
    the statistics by two passes in float64; a channel constant in that batch keeps
    :math:`s = 0`. A first batch with fewer than two values per channel raises ``ValueError``.
    :math:`\log|\det| = (\prod_{i \ge 2} n_i) \sum_c s_c`.

    Arguments:
        num_features: the number of channels :math:`C`, an integer of at least 1.
        eps: :math:`\epsilon > 0`, finite, added to the variance at initialisation.

    References:
        Kingma, Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
        NeurIPS 2018, https://arxiv.org/abs/1807.03039

    Example:
        The first training batch leaves every channel with zero mean and unit variance; each
        sample's log-det is :math:`H W \sum_c s_c` (here :math:`4 \cdot 4`):

        >>> norm = ActNorm(2)
        >>> x = torch.randn(64, 2, 4, 4) * 3 + 1
        >>> y, logdet = norm(x)
        >>> bool(y.mean((0, 2, 3)).abs().max() < 1e-5), bool((y.std((0, 2, 3)) - 1).abs().max() < 1e-2)
        (True, True)
        >>> torch.allclose(logdet, 16 * norm.log_scale.sum().expand(64))
        True
        >>> torch.allclose(norm.inverse(y), x, atol=1e-5)
        True
    """

    initialized: Tensor

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        check_count("num_features", num_features)
        check_interval("eps", eps, 0)
        self.num_features = num_features
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))
        self._seen_initialized = False  # a Python mirror of the buffer once it is True: no tensor branch

    def _broadcast(self, p: Tensor, x: Tensor) -> Tensor:
        return p.view(1, -1, *[1] * (x.dim() - 2))

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, name, None, self.bias.dtype)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{name}: expected {self.num_features} channels in dimension 1, got shape {tuple(x.shape)}"
            )

    @torch.no_grad()
    def _initialise(self, x: Tensor) -> None:
        """Zero mean and unit variance per channel, by two passes in float64 (a one-pass float32
        variance loses every digit for data with mean 100 and std 0.01). A channel without
        variance in the batch is centred and keeps its scale."""
        dims = [0, *range(2, x.dim())]
        count = torch.tensor(float(x.numel() // self.num_features), dtype=torch.float64, device=x.device)
        total = x.double().sum(dims)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            dist.all_reduce(total)
        if count < 2:
            raise ValueError(
                f"ActNorm initialises from its first training batch, which holds {int(count)} value(s) per channel: "
                "pass a batch of at least 2 samples (or call iresnet.initialize_from_data with one)"
            )
        mean = total / count
        squares = (x.double() - self._broadcast(mean, x)).pow(2).sum(dims)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(squares)
        variance = squares / count
        constant = variance <= (1e-12 * mean.abs().clamp_min(1.0)) ** 2
        log_scale = torch.where(constant, 0.0, -0.5 * torch.log(variance + self.eps))
        self.bias.copy_(-mean)
        self.log_scale.copy_(log_scale)
        self.initialized.fill_(True)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._seen_initialized = False  # read the loaded buffer at the next training call

    def _logdet(self, x: Tensor) -> Tensor:
        return (self.log_scale.sum() * x[0, 0].numel()).expand(x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "ActNorm input")
        if self.training and not self._seen_initialized:
            if not self.initialized:
                self._initialise(x)
            self._seen_initialized = True
        y = (x + self._broadcast(self.bias, x)) * self._broadcast(self.log_scale, x).exp()
        return y, self._logdet(x)

    def inverse(self, y: Tensor) -> Tensor:
        self._check(y, "ActNorm.inverse input")
        return y * self._broadcast(-self.log_scale, y).exp() - self._broadcast(self.bias, y)

    def extra_repr(self) -> str:
        return f"{self.num_features}"


@torch.no_grad()
def initialize_from_data(model: nn.Module, *inputs: Any) -> None:
    """Give every :class:`ActNorm` in a training-mode ``model`` its data-dependent initialisation
    from ``inputs`` (a no-op for those already initialised, and in eval mode, where ActNorm does
    not initialise), and fix the shapes the layers learn from their first input. Before
    ``torch.compile``, so that the compiled graph holds no data-dependent branch.

    Nothing else changes: the other modules run in eval mode (no power-iteration step, no
    BatchNorm statistics), every module's mode is restored, and so is the random state (a
    convolution's spectral norm met here for the first time starts its power iteration from the
    forked stream). The ActNorms see their inputs as eval-mode layers before them make them."""
    actnorms = [m for m in model.modules() if isinstance(m, ActNorm)]
    if not model.training:
        return
    modes = {m: m.training for m in model.modules()}
    devices = [t.device for t in inputs if isinstance(t, Tensor) and t.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        model.eval()
        for m in actnorms:
            m.train()
        try:
            model(*inputs)
        finally:
            for module, mode in modes.items():
                module.train(mode)


class Squeeze(InvertibleLayer):
    """2x2 space-to-depth, ``(C, H, W) -> (4C, H/2, W/2)``: invertible downsampling with
    log-det 0 (Dinh et al., "Density estimation using Real NVP", ICLR 2017)."""

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, name, None, None)
        if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"{name}: expected (batch, C, H, W) with even H and W, got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "Squeeze input")
        b, c, h, w = x.shape
        y = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(b)

    def forward_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one output for an input of ``shape`` ``(C, H, W)``."""
        c, h, w = shape
        return (4 * c, h // 2, w // 2)

    def inverse_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = shape
        return (c // 4, 2 * h, 2 * w)

    def inverse(self, y: Tensor) -> Tensor:
        check_input(y, "Squeeze.inverse input", None, None)
        if y.dim() != 4 or y.shape[1] % 4:
            raise ValueError(
                f"Squeeze.inverse input: expected (batch, 4C, H, W), channels a multiple of 4, got {tuple(y.shape)}"
            )
        b, c4, h, w = y.shape
        c = c4 // 4
        return y.view(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


class InjectivePad(InvertibleLayer):
    """Appends ``extra`` zero channels, ``(C, H, W) -> (C + extra, H, W)``. Injective, not
    bijective (``bijective = False``): it has no log-determinant, so ``logdet`` is ``None`` (see
    :mod:`iresnet.core.invertible`), and its inverse, which drops the extra channels, is a left
    inverse: ``inverse(forward(x))`` is ``x``, ``forward(inverse(y))`` is ``y`` only where the
    extra channels of ``y`` are zero. More channels give the residual branches room (Behrmann
    et al. pad 13 zero channels onto CIFAR-10's 3). ``extra`` is an integer of at least 0; both
    directions take finite ``(batch, C, H, W)``, the inverse more than ``extra`` channels."""

    bijective = False

    def __init__(self, extra: int) -> None:
        super().__init__()
        check_count("extra", extra, 0)
        self.extra = extra

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        check_input(x, "InjectivePad input", None, None)
        if x.dim() != 4:
            raise ValueError(f"InjectivePad input: expected (batch, C, H, W), got shape {tuple(x.shape)}")
        zeros = x.new_zeros(x.shape[0], self.extra, *x.shape[2:])
        return torch.cat([x, zeros], 1), None

    def inverse(self, y: Tensor) -> Tensor:
        name = "InjectivePad.inverse input"
        check_input(y, name, None, None)
        if y.dim() != 4 or y.shape[1] <= self.extra:
            raise ValueError(
                f"{name}: expected (batch, C + {self.extra}, H, W) with C >= 1 (the input's channels, then the "
                f"{self.extra} padded ones), got shape {tuple(y.shape)}"
            )
        return y[:, : y.shape[1] - self.extra]

    def forward_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        c, *rest = shape
        return (c + self.extra, *rest)

    def inverse_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        c, *rest = shape
        return (c - self.extra, *rest)

    def extra_repr(self) -> str:
        return f"extra={self.extra}"
