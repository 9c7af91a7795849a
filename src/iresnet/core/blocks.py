r"""Invertible layers with one convention: ``forward(x) -> (y, logdet)`` with ``logdet`` the
per-sample :math:`\log|\det \partial y / \partial x|` of shape ``(batch,)`` (or ``None`` where it
is not computed), and ``inverse(y) -> x``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .activations import LipSwish
from .compiled import compiled_iteration
from .inverse import INVERSE_METHODS, MAX_ITER, InversionError, InversionReport, default_tolerances, solve_fixed_point
from .jacobian import linearization_refusal, linearize
from .lipschitz import design_bound, frozen_power_iteration
from .logdet import LogDetEstimator, make_estimator
from .validation import check_choice, check_count, check_input, check_interval

__all__ = ["ResidualBlock", "ActNorm", "Squeeze", "Sequential", "initialize_from_data"]


def _parameter_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        return p.dtype
    return None


def _cache_parametrizations(module: nn.Module) -> None:
    """Evaluate every parametrized tensor once, so that inside ``parametrize.cached()`` all
    later uses share it (with its graph) whatever the grad mode of the later use."""
    for m in module.modules():
        if parametrize.is_parametrized(m):
            for name in m.parametrizations:
                getattr(m, name)


def _first_layer_mismatch(g: nn.Module, shape: tuple[int, ...]) -> str | None:
    """Why one input of ``shape`` cannot enter the branch's first ``Linear`` or ``Conv2d`` (read
    through a plain ``nn.Sequential``, elementwise activations and ``Flatten``), or ``None``."""
    flattened = False
    for layer in g if type(g) is nn.Sequential else (g,):
        if isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1:
            flattened = True
        elif isinstance(layer, nn.Linear):
            size = torch.Size(shape).numel() if flattened else shape[-1]
            if size != layer.in_features:
                return f"its first Linear takes {layer.in_features} features, the input gives {size}"
            return None
        elif isinstance(layer, nn.Conv2d):
            if flattened or len(shape) != 3 or shape[0] != layer.in_channels:
                return f"its first Conv2d takes (batch, {layer.in_channels}, H, W)"
            return None
        elif not isinstance(layer, (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity, LipSwish)):
            return None  # a layer whose input it cannot read: the branch itself will tell
    return None


class ResidualBlock(nn.Module):
    r"""An invertible residual block :math:`F(x) = x + g(x)` for :math:`\mathrm{Lip}(g) < 1`.

    ``y, logdet = block(x)`` returns :math:`F(x)` and an estimate of
    :math:`\log|\det(I + J_g(x))|` per sample; ``block.inverse(y)`` solves :math:`F(x) = y` by
    the Banach fixed-point iteration (or Anderson acceleration) and raises
    :class:`~iresnet.InversionError` for samples that do not converge. The report of the last
    inversion (iterations, evaluations of ``g``, residual) is kept in ``last_inversion``.
    Under autograd the inverse is differentiable by implicit differentiation:
    :math:`\partial x / \partial y = (I + J_g)^{-1}`.

    Arguments:
        g: the residual branch, Lipschitz below 1 (see :func:`~iresnet.spectral_norm`); it must
            act on each sample independently and keep the shape. A chain of spectral-normalised
            layers whose coefficients allow :math:`\mathrm{Lip}(g) \ge 1`
            (:func:`~iresnet.core.lipschitz.design_bound`) is refused with ``ValueError``: nothing can
            check an arbitrary ``g``, and for one that is not contractive the inverse and the
            log-det series are wrong.
        logdet: ``"exact"``, ``"series"``, ``"roulette"``, a mapping of a name and options
            (``{"name": "series", "n_terms": 10}``), an estimator from :mod:`iresnet.core.logdet`, or
            ``None`` (no log-det, for classifiers).
        inverse_method: ``"fixed_point"`` or ``"anderson"``.
        atol, rtol: the inversion's stopping tolerances (defaults by dtype: about 1e-5 in
            float32, 1e-10 in float64).
        max_iter: the cap on fixed-point iterations.
        anderson_memory: the history length of Anderson acceleration.
        event_shape: the shape of one input; taken from the first input if ``None``.
        jacobian: how the log-det reaches ``J_g``. ``"explicit"``: matrix products and
            convolutions from the branch's forward pass (:mod:`iresnet.core.jacobian`), so training
            needs one first-order backward pass and ``torch.compile`` accepts it; raises for a
            branch or estimator it cannot serve. ``"autograd"``: vector-Jacobian products by
            ``torch.autograd.grad``, whose gradient is a double backward; works for any ``g``.
            ``"auto"`` (default): explicit where possible. ``repr(block)`` names the path taken.
        compile_inverse: evaluate ``g`` in the inverse's iterations through one compiled function
            per branch architecture, the stopping rule's arithmetic fused with it
            (:func:`iresnet.core.compiled.compiled_iteration`): the first inversion pays the
            compilation, later ones run the iterations faster.

    References:
        Behrmann et al., "Invertible Residual Networks", ICML 2019,
        https://arxiv.org/abs/1811.00995

        Chen et al., "Residual Flows for Invertible Generative Modeling", NeurIPS 2019,
        https://arxiv.org/abs/1906.02735

    Example:
        >>> g = nn.Sequential(spectral_norm(nn.Linear(2, 16), 0.9), LipSwish(),
        ...                   spectral_norm(nn.Linear(16, 2), 0.9))
        >>> block = ResidualBlock(g, logdet="exact")
        >>> x = torch.randn(8, 2)
        >>> y, logdet = block(x)
        >>> bool(torch.allclose(block.inverse(y), x, atol=1e-4))
        True
    """

    def __init__(
        self,
        g: nn.Module,
        logdet: str | dict[str, Any] | LogDetEstimator | None = "roulette",
        *,
        inverse_method: str = INVERSE_METHODS[0],
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int = MAX_ITER,
        anderson_memory: int = 5,
        event_shape: tuple[int, ...] | None = None,
        jacobian: str = "auto",
        compile_inverse: bool = False,
    ) -> None:
        super().__init__()
        check_choice("inverse_method", inverse_method, INVERSE_METHODS)
        check_interval("atol", atol, 0, optional=True)
        check_interval("rtol", rtol, 0, optional=True)
        check_count("max_iter", max_iter)
        check_choice("jacobian", jacobian, ("auto", "explicit", "autograd"))
        promised = design_bound(g)
        if promised is not None and promised >= 1:
            raise ValueError(
                f"the branch's coefficients allow Lip(g) up to {promised:.4g}, and a residual block is invertible "
                "(its log-det series convergent) only for Lip(g) < 1: choose spectral-norm coefficients whose "
                "product with the activations' Lipschitz constants is below 1"
            )
        self.g = g
        self.logdet = make_estimator(logdet)
        self.inverse_method = inverse_method
        self.atol = atol
        self.rtol = rtol
        self.max_iter = max_iter
        self.anderson_memory = anderson_memory
        self.event_shape = None if event_shape is None else tuple(event_shape)
        self.last_inversion: InversionReport | None = None
        self.jacobian = jacobian
        self.compile_inverse = compile_inverse
        if jacobian == "explicit":
            self.jacobian_path  # noqa: B018 -- raises now, at construction, for a branch it cannot take

    def _explicit_refusal(self) -> str | None:
        """Why the explicit path cannot serve this block now (read at every call: hooks may come
        and go, the branch or the estimator may be replaced), or ``None``."""
        refusal = linearization_refusal(self.g)
        if refusal is not None:
            return refusal
        if self.logdet is not None and not self.logdet.explicit_jacobian:
            return f"the estimator {type(self.logdet).__name__} has no from_products"
        return None

    @property
    def jacobian_path(self) -> str:
        """``"explicit"`` or ``"autograd"``: how the log-det reaches the branch's Jacobian."""
        if self.jacobian == "autograd":
            return "autograd"
        refusal = self._explicit_refusal()
        if refusal is not None and self.jacobian == "explicit":
            raise ValueError(f"jacobian='explicit' is not possible: {refusal}; use 'auto' or 'autograd'")
        return "autograd" if refusal is not None else "explicit"

    def _check(self, x: Tensor, name: str) -> None:
        check_input(x, name, self.event_shape, _parameter_dtype(self.g))
        if self.event_shape is None:
            mismatch = _first_layer_mismatch(self.g, tuple(x.shape[1:]))
            if mismatch is not None:
                raise ValueError(f"{name}: shape {tuple(x.shape)} does not fit the branch: {mismatch}")
            self.event_shape = tuple(x.shape[1:])

    def _branch(self, x: Tensor) -> Tensor:
        gx = self.g(x)
        self._check_branch_shape(x, gx)
        return gx

    @staticmethod
    def _check_branch_shape(x: Tensor, gx: Tensor) -> None:
        if gx.shape != x.shape:
            raise ValueError(f"the residual branch g must keep the shape {tuple(x.shape)}, gave {tuple(gx.shape)}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        self._check(x, "ResidualBlock input")
        explicit = self.logdet is not None and self.jacobian_path == "explicit"
        # first: under torch.compile a draw on the host stops the graph, which then starts after it
        graph_free = not torch.is_grad_enabled() or getattr(self.logdet, "memory_efficient", False)
        draws = self.logdet.draw(x, graph_free) if explicit else None
        with parametrize.cached():
            if self.logdet is None:
                return x + self._branch(x), None
            differentiable = torch.is_grad_enabled()
            if explicit:
                products = linearize(self.g, x, checked=True)  # jacobian_path has just checked g
                self._check_branch_shape(x, products.output)
                return x + products.output, self.logdet.from_products(products, x, differentiable, draws)
            with torch.enable_grad():
                x_in = x if differentiable and x.requires_grad else x.detach().requires_grad_()
                gx = self._branch(x_in)
                logdet = self.logdet(self.g, x_in, gx, differentiable)
                y = x_in + gx
        if not differentiable:
            return y.detach(), logdet.detach()
        return y, logdet

    def inverse(self, y: Tensor, method: str | None = None) -> Tensor:
        """The unique ``x`` with ``x + g(x) = y``; ``method`` overrides ``inverse_method`` for this call."""
        if method is not None:
            check_choice("method", method, INVERSE_METHODS)
        self._check(y, "ResidualBlock.inverse input")
        differentiable = torch.is_grad_enabled() and (
            y.requires_grad or any(p.requires_grad for p in self.g.parameters())
        )
        with parametrize.cached(), frozen_power_iteration(self.g):
            _cache_parametrizations(self.g)
            iteration = None
            if self.compile_inverse:
                default_atol, default_rtol = default_tolerances(y.dtype)
                atol = default_atol if self.atol is None else self.atol
                rtol = default_rtol if self.rtol is None else self.rtol
                iteration = compiled_iteration(self.g, atol, rtol)
            with torch.no_grad():
                x, self.last_inversion = solve_fixed_point(
                    self.g,
                    y,
                    method or self.inverse_method,
                    self.atol,
                    self.rtol,
                    self.max_iter,
                    self.anderson_memory,
                    iteration,
                )
            if differentiable:
                x = self._implicit_gradient(x, y)
        return x

    def _implicit_gradient(self, x_star: Tensor, y: Tensor) -> Tensor:
        r"""``y - g(x*)`` (equal to ``x*`` within tolerance) whose backward pass applies
        :math:`(I + J_g)^{-\top}` by the fixed-point iteration :math:`u = a - J_g^\top u`."""
        x0 = x_star.detach().requires_grad_()
        gx0 = self.g(x0)
        x = y - gx0
        default_atol, default_rtol = default_tolerances(y.dtype)
        atol = default_atol if self.atol is None else self.atol
        rtol = default_rtol if self.rtol is None else self.rtol

        def apply_inverse_transpose(grad: Tensor | None) -> Tensor | None:
            if grad is None:  # an undefined gradient stays undefined
                return None
            u = grad
            for _ in range(self.max_iter):
                (jt_u,) = torch.autograd.grad(gx0, x0, u, retain_graph=True)
                u_next = grad - jt_u
                if ((u_next - u).abs() <= atol + rtol * u_next.abs()).all():
                    return u_next
                u = u_next
            raise InversionError(f"the implicit gradient of the inverse did not converge in {self.max_iter} iterations")

        x.register_hook(apply_inverse_transpose)
        return x

    def extra_repr(self) -> str:
        path = "autograd" if self.jacobian == "autograd" or self._explicit_refusal() else "explicit"  # never raises
        return f"logdet={self.logdet!r}, jacobian={path!r}, inverse_method={self.inverse_method!r}"


class ActNorm(nn.Module):
    r"""Per-channel affine map :math:`y = (x + b) \odot e^{s}` on dimension 1, initialised from
    the first training batch to zero mean and unit variance per channel (across processes
    under ``torch.distributed``): :math:`b = -\mu`, :math:`s = -\frac12 \log(\sigma^2 + \epsilon)`,
    the statistics by two passes in float64; a channel constant in that batch keeps
    :math:`s = 0`. A first batch with fewer than two values per channel raises ``ValueError``.
    :math:`\log|\det| = (\prod_{i \ge 2} n_i) \sum_c s_c`.

    References:
        Kingma, Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
        NeurIPS 2018, https://arxiv.org/abs/1807.03039
    """

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
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
            for m, mode in modes.items():
                m.train(mode)


class Squeeze(nn.Module):
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
        b, c4, h, w = y.shape
        if c4 % 4:
            raise ValueError(f"Squeeze.inverse input: channels must be a multiple of 4, got {c4}")
        c = c4 // 4
        return y.view(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


class Sequential(nn.Sequential):
    """A composition of invertible layers: log-dets add up (``None`` if any layer gives
    ``None``) and the inverse runs the layers' inverses in reverse order."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        total: Tensor | None = None
        missing = False
        for layer in self:
            x, logdet = layer(x)
            if logdet is None:
                missing = True
            elif not missing:
                total = logdet if total is None else total + logdet
        return x, None if missing else total

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self):
            y = layer.inverse(y)
        return y

    def forward_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one output; layers without ``forward_shape`` keep the shape."""
        for layer in self:
            shape = layer.forward_shape(shape) if hasattr(layer, "forward_shape") else shape
        return shape

    def inverse_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for layer in reversed(self):
            shape = layer.inverse_shape(shape) if hasattr(layer, "inverse_shape") else shape
        return shape
