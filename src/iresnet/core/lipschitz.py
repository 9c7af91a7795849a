r"""Lipschitz-constrained linear layers: spectral normalisation.

Spectral normalisation rescales a weight so that the operator norm of its layer stays below a
coefficient :math:`c < 1`,

.. math:: W \mapsto W / \max(1, \hat\sigma(W) / c),

with :math:`\hat\sigma` the largest singular value estimated by power iteration on the layer's
*operator*: the matrix for :class:`~torch.nn.Linear`, the convolution at the input's spatial
size (with its stride, padding and dilation) for :class:`~torch.nn.Conv2d`.

Power iteration approaches :math:`\sigma` from below, so an estimate that lags the weights lets
the true norm exceed :math:`c`: :func:`converge_spectral_norms` converges every estimate for the
weights as they are (by the Lanczos method, which resolves the close top singular values of
convolutions that stall power iteration), and :mod:`iresnet.core.certificates` certifies the
result (:func:`~iresnet.core.certificates.lipschitz_bound`).

References:
    Miyato et al., "Spectral Normalization for Generative Adversarial Networks", ICLR 2018,
    https://arxiv.org/abs/1802.05957

    Gouk et al., "Regularisation of Neural Networks by Enforcing Lipschitz Continuity", 2018,
    https://arxiv.org/abs/1804.04368

    Behrmann et al., "Invertible Residual Networks", ICML 2019, https://arxiv.org/abs/1811.00995

    Lanczos, "An Iteration Method for the Solution of the Eigenvalue Problem of Linear
    Differential and Integral Operators", J. Res. Nat. Bur. Standards 45, 1950; Golub and Van
    Loan, "Matrix Computations", 4th ed., section 10.1 (the residual of a Ritz pair)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
import torch.nn.grad
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from .attributes import attribute_set
from .validation import check_count, check_interval

__all__ = [
    "DEFAULT_COEFF",
    "DEFAULT_POWER_ITERATIONS",
    "SpectralNorm",
    "spectral_norm",
    "spectral_norms",
    "converge_spectral_norms",
    "frozen_power_iteration",
    "parametrizations_of",
    "weight_parametrizations",
]


DEFAULT_COEFF = 0.9
"""The default bound :math:`c` on each spectral-normalised layer's norm, and so on each residual
branch's Lipschitz constant (the i-ResNet papers' ``c = 0.9``), for every layer and builder."""

DEFAULT_POWER_ITERATIONS = 1
"""The default number of power-iteration steps per training evaluation of a normalised weight."""

_CONVERGE_TOLERANCE = 1e-6
_CONVERGE_MAX_ITER = 2000
_EXACT_PAIR_MAX_DIM = 1024
_KRYLOV_BYTES = 2**27  # the most memory one Lanczos basis may take; longer runs restart
_KRYLOV_MAX_DIM = 256


class SpectralNorm(nn.Module):
    r"""Parametrization :math:`W \mapsto W / \max(1, \hat\sigma / c)` for a linear or conv layer.

    In training mode every evaluation of the weight runs ``power_iterations`` steps of power
    iteration, warm-started from the previous vectors. In eval mode the vectors are frozen and
    :math:`\hat\sigma = v^\top W u` is read off them, after they have been converged for the
    weight as it is now: an eval-mode call on a weight changed since the last convergence (an
    optimiser step, a loaded state dict) converges first (:meth:`converge`); inside a ``torch.func``
    transform over the weight (``grad`` of ``functional_call``), which may write no buffer, the
    vectors converged last serve, as ``torch.nn.utils.parametrizations.spectral_norm``'s do in eval
    mode. A change is seen by the weight's version counter, which a write through ``.data``
    (``p.data.copy_(w)``) bypasses: write under ``torch.no_grad()`` to the parameter itself, or
    call :func:`converge_spectral_norms` after such a write. Eval mode divides by
    :math:`\hat\sigma (1 + 10\,\mathrm{tol})`, a margin over the convergence tolerance, so that
    the frozen weight's norm is at most ``coeff``.

    Arguments:
        layer: the ``nn.Linear`` or ``nn.Conv2d`` whose weight is normalised.
        coeff: the bound :math:`c` on the layer's operator norm, a finite number above 0.
        power_iterations: power-iteration steps per training evaluation.
        input_shape: ``(C, H, W)`` of a convolution's input; inferred at the first call if
            ``None``.
    """

    u: Tensor
    v: Tensor
    stride: tuple[int, ...]  # a convolution's, for its operator
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    def __init__(
        self,
        layer: nn.Linear | nn.Conv2d,
        coeff: float = DEFAULT_COEFF,
        power_iterations: int = DEFAULT_POWER_ITERATIONS,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        check_interval("coeff", coeff, 0)
        self.frozen = False  # set by frozen_power_iteration: a training-mode layer that does not iterate
        self.margin = 0.0
        self._converged_for: tuple | None = None
        check_count("power_iterations", power_iterations)
        self.coeff = coeff
        self.power_iterations = power_iterations
        self.is_conv = isinstance(layer, nn.Conv2d)
        weight = layer.weight.detach()
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError(
                    "spectral_norm supports Conv2d with groups=1, padding_mode='zeros' and "
                    f"integer padding, got groups={layer.groups}, "
                    f"padding_mode={layer.padding_mode!r}, padding={layer.padding!r}"
                )
            self.stride = layer.stride
            self.padding = layer.padding
            self.dilation = layer.dilation
            self.register_buffer("u", weight.new_empty(0))
            self.register_buffer("v", weight.new_empty(0))
            if input_shape is not None:
                self.set_input_shape(tuple(input_shape), weight)
        else:
            self.register_buffer("u", _unit(weight.new_empty(weight.shape[1]).normal_()))
            self.register_buffer("v", _unit(weight.new_empty(weight.shape[0]).normal_()))
            self.converge(weight)

    # The operator and its adjoint --------------------------------------------------------
    def apply_operator(self, weight: Tensor, x: Tensor) -> Tensor:
        """``W x``: the layer's linear part applied to an input-space vector."""
        if self.is_conv:
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation)
        return weight @ x

    def apply_adjoint(self, weight: Tensor, y: Tensor) -> Tensor:
        """``W^T y``: the adjoint, for conv the gradient of the convolution w.r.t. its input."""
        if self.is_conv:
            return torch.nn.grad.conv2d_input(self.u.shape, weight, y, self.stride, self.padding, self.dilation)
        return weight.T @ y

    # Power iteration ---------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The shape of one input (without batch), ``None`` for a conv not yet called."""
        if self.u.numel() == 0:
            return None
        return tuple(self.u.shape[1:]) if self.is_conv else tuple(self.u.shape)

    def set_input_shape(self, shape: tuple[int, ...], weight: Tensor) -> None:
        """Start the power iteration for a convolution on inputs of ``shape`` and converge it."""
        if self.input_shape == tuple(shape):
            return
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):  # vectors in the weight's dtype
            u = weight.new_empty((1, *shape)).normal_()
            v = F.conv2d(u, weight, None, self.stride, self.padding, self.dilation)
            self.u = _unit(u)
            self.v = _unit(v.normal_())
            self.converge(weight)

    @torch.no_grad()
    def power_iterate(self, weight: Tensor, steps: int) -> None:
        """Update ``u``, ``v`` in place by ``steps`` steps of power iteration, warm-started. Never in
        autocast: a bfloat16 estimate sits several per cent below the norm."""
        with torch.autocast(weight.device.type, enabled=False):
            for _ in range(steps):
                self.v.copy_(_unit(self.apply_operator(weight, self.u)))
                self.u.copy_(_unit(self.apply_adjoint(weight, self.v)))

    @torch.no_grad()
    def converge(
        self, weight: Tensor, tolerance: float = _CONVERGE_TOLERANCE, max_iter: int = _CONVERGE_MAX_ITER
    ) -> int:
        r"""Converge the vectors for ``weight``: the exact top singular pair (an eigensolve in
        float64) where the operator's matrix is small, else the top eigenvector of
        :math:`W^\top W` by the Lanczos method in float64 (:meth:`_lanczos`), until its residual is
        below ``tolerance`` times the eigenvalue; a warning where ``max_iter`` products did not
        get there; ``ValueError`` for a weight holding NaN or inf. Eval mode then adds a margin of
        ten times the tolerance. Returns the products with :math:`W^\top W` taken (0 for the
        eigensolve)."""
        if not bool(torch.isfinite(weight).all()):
            bad = int((~torch.isfinite(weight)).sum())
            raise ValueError(
                f"the weight holds NaN or inf ({bad} of {weight.numel()} entries): its spectral norm is undefined "
                "(a diverged optimiser step, or a damaged state dict?)"
            )
        with torch.autocast(weight.device.type, enabled=False):
            steps, converged = (
                (0, True) if self._exact_singular_pair(weight) else self._lanczos(weight, tolerance, max_iter)
            )
        if not converged:
            warnings.warn(
                f"the spectral norm's Lanczos iteration did not converge to {tolerance:g} in {max_iter} steps: "
                "certify the layer with iresnet.lipschitz_bound",
                RuntimeWarning,
                stacklevel=3,
            )
        self.margin = 10 * tolerance
        self._converged_for = _weight_state(weight)
        return steps

    def _lanczos(self, weight: Tensor, tolerance: float, max_iter: int) -> tuple[int, bool]:
        r"""The top eigenpair :math:`(\theta, y)` of :math:`A = W^\top W` by Lanczos with full
        reorthogonalisation, in float64: the Krylov basis :math:`Q` turns :math:`A` into the
        tridiagonal :math:`T = Q^\top A Q`, whose top eigenvector :math:`s` gives :math:`y = Qs`
        with residual :math:`\|Ay - \theta y\| = \beta_k |s_k|`. Stops once that is at most
        ``tolerance`` :math:`\theta` (or the basis spans the space); a basis that would outgrow
        its memory restarts from :math:`y`. Sets ``u = y`` and ``v = Wy / |Wy|``; returns the
        products taken and whether it converged.

        The start is ``u`` plus a fixed small random part (its own generator: the global random
        state stays as it was), so that no direction of the top singular vector is missing from
        it: a vector with zero entries (``_unit`` sets negligible ones to 0) could lie in an
        invariant subspace without it.

        Power iteration converges as :math:`(\sigma_2/\sigma_1)^{2k}`: a convolution's top
        singular values lie close together (within :math:`10^{-5}` relative in trained flows),
        where it stalls short of :math:`\sigma` by more than any margin. Lanczos converges with
        the square root of that gap."""
        weight = weight.double()
        shape = self.u.shape
        n = shape.numel()
        size = max(2, min(n, _KRYLOV_MAX_DIM, _KRYLOV_BYTES // (8 * n)))
        generator = torch.Generator(weight.device).manual_seed(0)
        noise = torch.randn(n, generator=generator, device=weight.device, dtype=torch.float64)
        y = self.u.double().flatten()
        y = y + 1e-3 * noise * (torch.linalg.vector_norm(y) if torch.linalg.vector_norm(y) > 0 else 1.0) / n**0.5
        taken, converged = 0, False
        while not converged and taken < max_iter:
            basis = y.new_zeros(size, n)
            basis[0] = y / torch.linalg.vector_norm(y)
            alphas: list[float] = []
            betas: list[float] = []
            for k in range(size):
                z = self.apply_adjoint(weight, self.apply_operator(weight, basis[k].view(shape))).flatten()
                taken += 1
                alphas.append(torch.dot(z, basis[k]).item())
                active = basis[: k + 1]
                for _ in range(2):  # twice is enough (Kahan's rule)
                    z = z - active.T @ (active @ z)
                beta = torch.linalg.vector_norm(z).item()
                theta, s = _top_ritz_pair(alphas, betas)
                converged = beta * abs(s[-1].item()) <= tolerance * theta or k + 1 >= n
                if converged or taken >= max_iter or k + 1 == size:
                    break
                betas.append(beta)
                basis[k + 1] = z / beta
            y = s.to(basis) @ basis[: k + 1]
        self.u.copy_(_unit(y.view(shape).to(self.u.dtype)))
        self.v.copy_(_unit(self.apply_operator(weight, y.view(shape)).to(self.v.dtype)))
        return taken, converged

    def _exact_singular_pair(self, weight: Tensor) -> bool:
        """Set ``u``, ``v`` to the operator's top singular vectors when its matrix has at most
        :data:`_EXACT_PAIR_MAX_DIM` rows and columns (from the eigenvectors of its Gram matrix);
        returns whether it did."""
        if self.is_conv:
            n_in = self.u.numel()
            n_out = self.v.numel()
            if max(n_in, n_out) > _EXACT_PAIR_MAX_DIM:
                return False
            basis = torch.eye(n_in, dtype=torch.float64, device=weight.device).view(n_in, *self.u.shape[1:])
            rows = F.conv2d(basis, weight.double(), None, self.stride, self.padding, self.dilation)
            matrix = rows.reshape(n_in, n_out).T  # the operator: W e_i is its column i
        else:
            matrix = weight.double()
        # The top eigenvector of the smaller Gram matrix, by eigh: LAPACK's SVD (gesdd) fails to converge on
        # some trained operators whose singular values repeat (a 1x1 convolution's, once per pixel).
        if matrix.shape[1] <= matrix.shape[0]:
            right = torch.linalg.eigh(matrix.T @ matrix).eigenvectors[:, -1]
            left = matrix @ right
        else:
            left = torch.linalg.eigh(matrix @ matrix.T).eigenvectors[:, -1]
            right = matrix.T @ left
        self.v.copy_(_unit(left.to(self.v.dtype)).view_as(self.v))
        self.u.copy_(_unit(right.to(self.u.dtype)).view_as(self.u))
        return True

    @torch.compiler.disable  # reads the weight's version: outside any compiled graph
    def _converge_if_stale(self, weight: Tensor) -> None:
        if _weight_state(weight) is None:  # a weight of torch.func's transforms: no buffer may be written
            if self._converged_for is None:
                raise RuntimeError(
                    "an eval-mode spectral norm inside a torch.func transform over its weight uses the vectors it "
                    "converged last, and it has none (never converged, or trained since): call "
                    "iresnet.converge_spectral_norms(model) in eval mode before the transform"
                )
            return
        if self.is_stale(weight):
            self.converge(weight.detach())

    def is_stale(self, weight: Tensor) -> bool:
        """Whether ``weight`` changed (in place, or for another tensor) since the last
        :meth:`converge`, or the vectors moved since (a training-mode step)."""
        state = _weight_state(weight)
        return state is None or self._converged_for != state

    def sigma(self, weight: Tensor) -> Tensor:
        r""":math:`\hat\sigma = v^\top W u`, differentiable in ``weight``."""
        u, v = self.u, self.v
        if self.training:  # later in-place updates must not touch tensors saved for backward
            u, v = u.clone(), v.clone()
        return torch.sum(v * self.apply_operator(weight, u))

    def forward(self, weight: Tensor) -> Tensor:
        with torch.autocast(weight.device.type, enabled=False):  # the estimate stays in the weight's dtype
            return self._normalised(weight)

    def _normalised(self, weight: Tensor) -> Tensor:
        if self.input_shape is None:
            raise RuntimeError(
                "the spectral norm of this Conv2d needs its input shape: pass "
                "input_shape=(C, H, W) to spectral_norm or call the layer once first"
            )
        if not self.training:
            self._converge_if_stale(weight)
            return weight / torch.clamp(self.sigma(weight) * (1 + self.margin) / self.coeff, min=1.0)
        if not self.frozen:
            self.power_iterate(weight, self.power_iterations)
            self._converged_for = None
        return weight / torch.clamp(self.sigma(weight) / self.coeff, min=1.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A convolution's vectors take their shape from the input size, known only once run.
        for name in ("u", "v"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}, power_iterations={self.power_iterations}, input_shape={self.input_shape}"


def _top_ritz_pair(alphas: list[float], betas: list[float]) -> tuple[float, Tensor]:
    """The largest eigenvalue of the symmetric tridiagonal matrix with diagonal ``alphas`` and
    off-diagonal ``betas``, and its unit eigenvector (float64)."""
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    return values[-1].item(), vectors[:, -1]


def _weight_state(weight: Tensor) -> tuple | None:
    """What identifies a weight's values without reading them: its storage, its in-place version
    (an inference tensor has no version, and cannot change outside inference mode) and the fused
    optimiser steps taken on it (:func:`_count_fused_steps`). ``None``, never equal to a recorded
    state, where it cannot be read (a tensor of ``torch.func``'s transforms, without storage)."""
    try:
        version = None if weight.is_inference() else weight._version
        return weight.data_ptr(), version, getattr(weight, _FUSED_STEPS, 0), weight.dtype, weight.device
    except RuntimeError:
        return None


_FUSED_STEPS = "_iresnet_fused_steps"


def _count_fused_steps(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """A global optimiser step post-hook: a fused step (``fused=True``, e.g. ``torch.optim.Adam``'s)
    writes its parameters without bumping their version counters, by which an eval-mode spectral
    norm sees that its weight changed; so such a step is counted on each of its parameters."""
    for group in optimizer.param_groups:
        if group.get("fused") or optimizer.defaults.get("fused"):
            for parameter in group["params"]:
                setattr(parameter, _FUSED_STEPS, getattr(parameter, _FUSED_STEPS, 0) + 1)


register_optimizer_step_post_hook(_count_fused_steps)


def _unit(x: Tensor) -> Tensor:
    """``x / |x|`` with negligible entries set to 0: power iteration drives the entries outside
    the top singular vector towards zero, and denormal floats slow the CPU a thousandfold."""
    x = x / torch.linalg.vector_norm(x).clamp_min(1e-12)
    return x.masked_fill_(x.abs() < torch.finfo(x.dtype).tiny ** 0.5, 0.0)


def parametrizations_of(module: nn.Module) -> parametrize.ParametrizationList:
    """``module.parametrizations.weight`` for a module whose weight is parametrized: its
    parametrizations and the ``original`` weight (torch types the attributes that
    :mod:`~torch.nn.utils.parametrize` adds as tensors or modules)."""
    return cast(parametrize.ParametrizationList, cast(nn.ModuleDict, module.parametrizations)["weight"])


def _record_input_shape(layer: nn.Module, args: tuple) -> None:
    if not parametrize.is_parametrized(layer, "weight"):
        return
    parametrizations = parametrizations_of(layer)
    for p in parametrizations:
        if isinstance(p, SpectralNorm) and p.is_conv:
            p.set_input_shape(tuple(args[0].shape[1:]), parametrizations.original)


def records_input_shape(hook: Callable) -> bool:
    """Whether a forward pre-hook is the one :func:`spectral_norm` puts on a convolution."""
    return hook is _record_input_shape


def spectral_norm(
    module: nn.Linear | nn.Conv2d,
    coeff: float = DEFAULT_COEFF,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    *,
    input_shape: tuple[int, ...] | None = None,
) -> nn.Linear | nn.Conv2d:
    r"""Constrain the operator norm of ``module`` to at most ``coeff`` (approximately: see
    :class:`SpectralNorm`; :func:`~iresnet.core.certificates.lipschitz_bound` certifies it).

    The weight becomes a :mod:`torch.nn.utils.parametrize` parametrization, so ``state_dict``,
    optimisers, ``torch.compile`` and ``parametrize.remove_parametrizations`` work as usual.

    Example:
        >>> layer = spectral_norm(nn.Linear(4, 4), coeff=0.9)
        >>> bool(torch.linalg.matrix_norm(layer.weight, ord=2) <= 0.9 + 1e-4)
        True
    """
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"spectral_norm takes nn.Linear or nn.Conv2d, got {type(module).__name__}")
    parametrization = SpectralNorm(module, coeff, power_iterations, input_shape)
    parametrize.register_parametrization(module, "weight", parametrization, unsafe=True)
    if isinstance(module, nn.Conv2d):
        module.register_forward_pre_hook(_record_input_shape)
    return module


_Parametrization = TypeVar("_Parametrization", bound=nn.Module)


def weight_parametrizations(
    model: nn.Module, kind: type[_Parametrization]
) -> Iterator[tuple[nn.Module, _Parametrization]]:
    """Every layer of ``model`` with a parametrization of type ``kind`` on its weight, with it."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in parametrizations_of(module):
                if isinstance(p, kind):
                    yield module, p


def spectral_norms(model: nn.Module) -> Iterator[tuple[nn.Module, SpectralNorm]]:
    """Every layer of ``model`` with a :class:`SpectralNorm` on its weight, with that parametrization."""
    return weight_parametrizations(model, SpectralNorm)


@torch.no_grad()
def converge_spectral_norms(
    model: nn.Module, tolerance: float = _CONVERGE_TOLERANCE, max_iter: int = _CONVERGE_MAX_ITER
) -> int:
    """Converge every spectral norm in ``model`` for its current weight (:meth:`SpectralNorm.converge`:
    the exact singular pair of small operators, else the Lanczos method until the residual is
    below ``tolerance``), so that the frozen eval-mode weights obey their coefficient. Eval-mode
    calls also do this for a weight that changed; calling it first keeps the cost out of the first
    call. Returns the number of layers converged.

    Example:
        >>> layer = spectral_norm(nn.Linear(8, 8), coeff=0.9)
        >>> with torch.no_grad():
        ...     _ = layer.parametrizations.weight.original.mul_(3)  # as an optimiser step might
        >>> _ = layer.eval(), converge_spectral_norms(layer)
        >>> bool(torch.linalg.matrix_norm(layer.weight.double(), ord=2) <= 0.9)
        True
    """
    count = 0
    for module, p in spectral_norms(model):
        if p.input_shape is None:
            raise RuntimeError(
                f"{module} has not seen an input yet, so its operator is unknown: "
                "run the model once or pass input_shape to spectral_norm"
            )
        p.converge(parametrizations_of(module).original, tolerance, max_iter)
        count += 1
    return count


def frozen_power_iteration(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within the context no training-mode spectral norm in ``model`` updates its estimate, so
    that repeated evaluations (an inversion's iterations) see one fixed function: the one of the
    last training-mode call. Eval-mode layers are fixed already."""
    return attribute_set((p for _, p in spectral_norms(model)), "frozen", True)
