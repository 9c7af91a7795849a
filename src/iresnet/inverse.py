r"""Inverting :math:`y = x + g(x)` for contractive :math:`g`.

For :math:`\mathrm{Lip}(g) = L < 1` the map :math:`x \mapsto y - g(x)` is a contraction, so the
Banach iteration :math:`x_{k+1} = y - g(x_k)` from :math:`x_0 = y` converges to the unique
preimage, with error :math:`|x_k - x| \le L^k / (1 - L) \, |x_1 - x_0|`. Anderson acceleration
extrapolates from the last few iterates of the same map and needs fewer evaluations of ``g``.

Both solvers share one stopping rule, applied per sample and per element: the update
:math:`|f(x_k) - x_k|` must fall below ``atol + rtol * |f(x_k)|``. A sample that never meets it
raises :class:`InversionError`; nothing returns silently at the iteration cap.

References:
    Behrmann et al., "Invertible Residual Networks", ICML 2019, https://arxiv.org/abs/1811.00995

    Walker, Ni, "Anderson Acceleration for Fixed-Point Iterations", SIAM J. Numer. Anal. 2011
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["InversionError", "InversionReport", "default_tolerances", "solve_fixed_point"]


class InversionError(RuntimeError):
    """The fixed-point inversion did not reach its tolerance for some samples."""


@dataclass
class InversionReport:
    r"""What an inversion cost and how well it converged.

    Attributes:
        method: ``"fixed_point"`` or ``"anderson"``.
        iterations: iterations until the last sample converged.
        evaluations: calls of ``g`` (each on the samples still unconverged).
        sample_evaluations: evaluations of ``g`` counted per sample.
        max_residual: the largest final update :math:`\max |f(x) - x|` over the batch.
    """

    method: str
    iterations: int
    evaluations: int
    sample_evaluations: int
    max_residual: float


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` for ``dtype``: 1e-5 for float32 and below, 1e-10 for float64."""
    return (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-5)


def solve_fixed_point(
    g: Callable[[Tensor], Tensor],
    y: Tensor,
    method: str = "fixed_point",
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = 100,
    memory: int = 5,
) -> tuple[Tensor, InversionReport]:
    """Solve :math:`x + g(x) = y` per sample; ``g`` must act on each sample independently.

    Arguments:
        g: the residual branch.
        y: the outputs, shape ``(batch, ...)``.
        method: ``"fixed_point"`` (Banach iteration) or ``"anderson"``.
        atol, rtol: the stopping rule's tolerances (defaults from :func:`default_tolerances`).
        max_iter: the most evaluations of ``g`` per sample.
        memory: Anderson's history length.

    Returns:
        The solution and an :class:`InversionReport`.

    Raises:
        InversionError: when a sample has not converged after ``max_iter`` iterations or its
            iterate left the finite numbers.
    """
    if method not in ("fixed_point", "anderson"):
        raise ValueError(f"method must be 'fixed_point' or 'anderson', got {method!r}")
    default_atol, default_rtol = default_tolerances(y.dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    solver = _Anderson(y, memory) if method == "anderson" else _Banach(y)
    x = y.clone()
    residual = torch.full((y.shape[0],), float("inf"), dtype=y.dtype, device=y.device)
    active = torch.arange(y.shape[0], device=y.device)
    evaluations = sample_evaluations = 0
    iteration = 0
    while active.numel() and iteration < max_iter:
        iteration += 1
        x_active = x[active]
        f_active = y[active] - g(x_active)
        evaluations += 1
        sample_evaluations += active.numel()
        step = (f_active - x_active).flatten(1)
        residual[active] = step.abs().amax(1)
        converged = (step.abs() <= atol + rtol * f_active.flatten(1).abs()).all(1)
        diverged = ~torch.isfinite(f_active.flatten(1)).all(1)
        if diverged.any():
            raise InversionError(
                f"fixed-point inversion ({method}) diverged for {int(diverged.sum())} of "
                f"{y.shape[0]} samples at iteration {iteration}: the iterate is not finite. "
                "Lip(g) may be >= 1 (call iresnet.converge_spectral_norms first)."
            )
        x[active[converged]] = f_active[converged]
        still = ~converged
        x[active[still]] = solver.next_iterate(active[still], x_active[still], f_active[still])
        active = active[still]
    report = InversionReport(method, iteration, evaluations, sample_evaluations,
                             residual.max().item() if residual.numel() else 0.0)
    if active.numel():
        worst = residual[active]
        shown = ", ".join(f"{r:.3g}" for r in worst[:5].tolist())
        raise InversionError(
            f"fixed-point inversion ({method}) failed for {active.numel()} of {y.shape[0]} "
            f"samples after {iteration} iterations: their updates are {shown}"
            f"{' ...' if active.numel() > 5 else ''} against atol={atol:g}, rtol={rtol:g}. "
            "Lip(g) may be >= 1 (call iresnet.converge_spectral_norms first) or max_iter too low."
        )
    return x, report


class _Banach:
    """Plain iteration: the next iterate is ``f(x)``."""

    def __init__(self, y: Tensor) -> None:
        pass

    def next_iterate(self, index: Tensor, x: Tensor, fx: Tensor) -> Tensor:
        return fx


class _Anderson:
    r"""Anderson acceleration (type II) with a ring buffer of the last ``memory`` iterates.

    With residuals :math:`r_i = f(x_i) - x_i`, choose weights :math:`\alpha` with
    :math:`\sum \alpha_i = 1` minimising :math:`\|\sum \alpha_i r_i\|` and step to
    :math:`\sum \alpha_i f(x_i)`. The small Gram systems are solved in float64."""

    def __init__(self, y: Tensor, memory: int) -> None:
        if memory < 1:
            raise ValueError(f"Anderson memory must be at least 1, got {memory}")
        batch, dim = y.shape[0], y[0].numel()
        self.memory = memory
        self.f_history = y.new_zeros(batch, memory, dim)
        self.r_history = y.new_zeros(batch, memory, dim)
        self.count = torch.zeros(batch, dtype=torch.long, device=y.device)

    def next_iterate(self, index: Tensor, x: Tensor, fx: Tensor) -> Tensor:
        if index.numel() == 0:
            return fx
        fx_flat, r_flat = fx.flatten(1), (fx - x).flatten(1)
        slot = self.count[index] % self.memory
        self.f_history[index, slot] = fx_flat
        self.r_history[index, slot] = r_flat
        self.count[index] += 1
        used = min(int(self.count[index].min()), self.memory)
        if used < 2:
            return fx
        r = self.r_history[index].double()
        f = self.f_history[index]
        if used < self.memory:  # every active sample has filled the same first slots
            r, f = r[:, :used], f[:, :used]
        gram = r @ r.transpose(1, 2)
        scale = gram.diagonal(dim1=1, dim2=2).amax(1).clamp_min(1e-300)
        gram = gram + 1e-10 * scale[:, None, None] * torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
        ones = torch.ones(gram.shape[:2], dtype=gram.dtype, device=gram.device)
        alpha = torch.linalg.solve(gram, ones)
        alpha = alpha / alpha.sum(1, keepdim=True)
        return (alpha.to(f.dtype).unsqueeze(1) @ f).squeeze(1).view_as(fx)
