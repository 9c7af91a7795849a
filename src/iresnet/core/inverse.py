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

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from .validation import check_choice

__all__ = [
    "INVERSE_METHODS",
    "MAX_ITER",
    "InversionError",
    "InversionReport",
    "default_tolerances",
    "solve_fixed_point",
]

INVERSE_METHODS = ("fixed_point", "anderson")
"""The solvers: the Banach fixed-point iteration (the default), Anderson acceleration."""

MAX_ITER = 100
"""The default cap on a solver's iterations (evaluations of ``g`` per sample)."""


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
    method: str = INVERSE_METHODS[0],
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = MAX_ITER,
    memory: int = 5,
    iteration: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None,
) -> tuple[Tensor, InversionReport]:
    r"""Solve :math:`x + g(x) = y` per sample; ``g`` must act on each sample independently.

    Arguments:
        g: the residual branch.
        y: the outputs, shape ``(batch, ...)``.
        method: ``"fixed_point"`` (Banach iteration) or ``"anderson"``.
        atol, rtol: the stopping rule's tolerances (defaults from :func:`default_tolerances`).
        max_iter: the most evaluations of ``g`` per sample.
        memory: Anderson's history length.
        iteration: ``(x, y) -> (f(x), max |f(x) - x| per sample, converged per sample)`` with
            :math:`f(x) = y - g(x)` and the stopping rule above, in place of the eager one (for
            example one compiled function, :func:`iresnet.core.compiled.compiled_iteration`).

    Returns:
        The solution and an :class:`InversionReport`.

    Raises:
        InversionError: when a sample has not converged after ``max_iter`` iterations or its
            iterate left the finite numbers.

    Example:
        For :math:`g(x) = x / 2` the solution of :math:`x + x / 2 = y` is :math:`2y/3`. The
        Banach iteration halves the error at each step (:math:`\mathrm{Lip}(g) = 1/2`), so it
        reaches float64's tolerance of 1e-10 in 33; Anderson acceleration solves a linear
        :math:`g` in 3:

        >>> y = torch.ones(3, 2, dtype=torch.float64)
        >>> x, report = solve_fixed_point(lambda x: x / 2, y)
        >>> torch.allclose(x, 2 * y / 3, rtol=0, atol=1e-9), report.iterations
        (True, 33)
        >>> solve_fixed_point(lambda x: x / 2, y, "anderson")[1].iterations
        3
    """
    check_choice("method", method, INVERSE_METHODS)
    default_atol, default_rtol = default_tolerances(y.dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    batch = y.shape[0]
    solver = _Anderson(y, memory) if method == "anderson" else _Banach()
    solution = y.clone()
    residual = y.new_zeros(batch)
    # the working set: the samples not yet converged, compacted after each iteration
    index = torch.arange(batch, device=y.device)
    x, target = y, y
    worst = y.new_full((batch,), float("inf"))
    step_of = iteration or partial(iteration_step, g, atol=atol, rtol=rtol)
    evaluations = sample_evaluations = iterations = 0
    stretch = _StretchWatch(batch, atol, rtol)
    while index.numel() and iterations < max_iter:
        iterations += 1
        fx, worst, converged = step_of(x, target)
        evaluations += 1
        sample_evaluations += index.numel()
        stretch.observe(index, x, fx)
        if not torch.isfinite(worst).all():
            raise InversionError(
                f"fixed-point inversion ({method}) diverged for "
                f"{int((~torch.isfinite(worst)).sum())} of {batch} samples at iteration "
                f"{iterations}: the iterate is not finite. Lip(g) may be >= 1 "
                "(call iresnet.converge_spectral_norms first)."
            )
        if converged.any():
            done = converged.nonzero().squeeze(1)
            solution[index[done]] = fx[done]
            residual[index[done]] = worst[done]
            keep = (~converged).nonzero().squeeze(1)
            index, x, fx, target, worst = (t.index_select(0, keep) for t in (index, x, fx, target, worst))
            solver.keep(keep)
            stretch.keep(keep)
        if index.numel():
            x = solver.next_iterate(x, fx)
    if index.numel():
        shown = ", ".join(f"{r:.3g}" for r in worst[:5].tolist())
        raise InversionError(
            f"fixed-point inversion ({method}) failed for {index.numel()} of {batch} "
            f"samples after {iterations} iterations: their updates are {shown}"
            f"{' ...' if index.numel() > 5 else ''} against atol={atol:g}, rtol={rtol:g}. "
            "Lip(g) may be >= 1 (call iresnet.converge_spectral_norms first) or max_iter too low."
        )
    stretch.warn(method)
    report = InversionReport(
        method, iterations, evaluations, sample_evaluations, residual.max().item() if batch else 0.0
    )
    return solution, report


class _StretchWatch:
    r"""Proof from the iterates that ``g`` is not a contraction: with :math:`f(x) = y - g(x)`,
    :math:`\|f(x_k) - f(x_j)\| / \|x_k - x_j\| \le \mathrm{Lip}(g)` for any two iterates of a
    sample. The last two are compared, where they differ by more than rounding could explain
    (a hundred times the stopping tolerance). A root found for a ``g`` that stretches may be one
    of several preimages: the solver then warns."""

    def __init__(self, batch: int, atol: float, rtol: float) -> None:
        self.atol, self.rtol = atol, rtol
        self.previous: tuple[Tensor, Tensor] | None = None
        self.largest = 0.0
        self.samples: set[int] = set()

    def observe(self, index: Tensor, x: Tensor, fx: Tensor) -> None:
        if self.previous is not None and not torch.compiler.is_compiling():
            before_x, before_fx = self.previous
            dx = (x - before_x).flatten(1)
            step = dx.norm(dim=1)
            size = x.flatten(1).norm(dim=1) + fx.flatten(1).norm(dim=1)
            apart = step > 100 * (self.atol * dx.shape[1] ** 0.5 + self.rtol * size)
            ratio = (fx - before_fx).flatten(1).norm(dim=1) / step.clamp_min(1e-300)
            rounding = 10 * torch.finfo(x.dtype).eps * size / step.clamp_min(1e-300)  # what rounding in g can add
            stretched = apart & (ratio > 1 + 1e-3 + rounding)
            if stretched.any():
                self.largest = max(self.largest, ratio[stretched].max().item())
                self.samples.update(index[stretched].tolist())
        self.previous = (x, fx)

    def keep(self, rows: Tensor) -> None:
        if self.previous is not None:
            x, fx = self.previous
            self.previous = (x.index_select(0, rows), fx.index_select(0, rows))

    def warn(self, method: str) -> None:
        if self.samples:
            warnings.warn(
                f"the {method} inversion converged, but g stretched the distance between two iterates by "
                f"{self.largest:.4g} > 1 for {len(self.samples)} sample(s): g is not a contraction there, so the "
                "preimage found may not be the only one. Converge the spectral norms "
                "(iresnet.converge_spectral_norms) or use coefficients below 1",
                RuntimeWarning,
                stacklevel=3,
            )


def iteration_step(
    g: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, atol: float, rtol: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:math:`f(x) = y - g(x)`, the largest update per sample, and whether each sample converged:
    :math:`|f(x) - x| \\le atol + rtol |f(x)|` elementwise."""
    fx = y - g(x)
    step = (fx - x).flatten(1).abs()
    return fx, step.amax(1), (step <= atol + rtol * fx.flatten(1).abs()).all(1)


class _Banach:
    """Plain iteration: the next iterate is ``f(x)``."""

    def keep(self, rows: Tensor) -> None:
        pass

    def next_iterate(self, x: Tensor, fx: Tensor) -> Tensor:
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
        self.r_history = y.new_zeros(batch, memory, dim, dtype=torch.float64)
        self.count = 0

    def keep(self, rows: Tensor) -> None:
        self.f_history, self.r_history = self.f_history.index_select(0, rows), self.r_history.index_select(0, rows)

    def next_iterate(self, x: Tensor, fx: Tensor) -> Tensor:
        slot = self.count % self.memory
        self.f_history[:, slot] = fx.flatten(1)
        self.r_history[:, slot] = (fx - x).flatten(1)
        self.count += 1
        used = min(self.count, self.memory)
        if used < 2:
            return fx
        r, f = self.r_history[:, :used], self.f_history[:, :used]
        gram = r @ r.transpose(1, 2)
        scale = gram.diagonal(dim1=1, dim2=2).amax(1).clamp_min(1e-300)
        gram = gram + 1e-10 * scale[:, None, None] * torch.eye(used, dtype=gram.dtype, device=gram.device)
        alpha = torch.linalg.solve(gram, torch.ones(gram.shape[:2], dtype=gram.dtype, device=gram.device))
        alpha = alpha / alpha.sum(1, keepdim=True)
        return (alpha.to(f.dtype).unsqueeze(1) @ f).squeeze(1).view_as(fx)
