"""Inverting a trained classifier's trunk from its final features back to the input: the
reconstruction error, the cost of the fixed-point and Anderson inversions per block, and each
block's certified Lipschitz bound (Behrmann et al., 2019, section 5)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from ..core.certificates import lipschitz_bound
from ..core.inverse import InversionError
from ..core.invertible import Invertible
from ..core.lipschitz import converge_spectral_norms
from ..core.residual import ResidualBlock
from ..models.classifier import Classifier
from ..train.checkpoint import load_run
from ..train.distributed import resolve_device
from ..train.sources import run_source
from . import plots

__all__ = ["BlockReport", "Reconstruction", "RunReconstruction", "reconstruct", "reconstruct_run"]

_METHODS = ("fixed_point", "anderson")


@dataclass
class BlockReport:
    """One residual block: its certified :math:`\\mathrm{Lip}(g)` and the iterations each
    inversion method needed (``None`` where it failed)."""

    bound: float
    iterations: dict[str, int | None] = field(default_factory=dict)


@dataclass
class Reconstruction:
    """Inputs recovered from features (``None`` if an inversion failed, with ``failure`` saying
    where), their max and mean absolute error, and a report per block."""

    images: Tensor | None
    max_error: float | None
    mean_error: float | None
    blocks: list[BlockReport]
    failure: str | None = None


@torch.no_grad()
def reconstruct(model: Classifier, images: Tensor, methods: tuple[str, ...] = _METHODS) -> Reconstruction:
    """Features of ``images`` inverted back by each method in ``methods`` (in eval mode, spectral
    norms converged); the reconstruction and its errors come from the first method."""
    model.eval()
    converge_spectral_norms(model)
    blocks = [m for m in model.trunk if isinstance(m, ResidualBlock)]
    features = model.features(images)
    reports = [BlockReport(lipschitz_bound(b.g, _input_shape(b))) for b in blocks]
    recovered, failure = None, None
    for method in methods:
        for block in blocks:
            block.last_inversion = None
        try:
            result = _invert_trunk(model, features, method)
        except InversionError as error:
            failure = failure or f"{method}: {error}"
            result = None
        for report, block in zip(reports, blocks):
            report.iterations[method] = None if block.last_inversion is None else block.last_inversion.iterations
        if method == methods[0]:
            recovered = result
    if recovered is None:
        return Reconstruction(None, None, None, reports, failure)
    difference = (recovered - images.to(recovered)).abs()
    return Reconstruction(recovered, difference.max().item(), difference.mean().item(), reports, failure)


def _input_shape(block: ResidualBlock) -> tuple[int, ...]:
    """The shape of one input of ``block``, which it takes from its first input."""
    if block.event_shape is None:
        raise RuntimeError("a residual block of the trunk has seen no input: its branch's input shape is unknown")
    return block.event_shape


def _invert_trunk(model: Classifier, features: Tensor, method: str) -> Tensor:
    """:meth:`Classifier.reconstruct` with every residual block inverted by ``method``."""
    x = features
    for layer in reversed(model.trunk):
        x = layer.inverse(x, method=method) if isinstance(layer, ResidualBlock) else cast(Invertible, layer).inverse(x)
    return x


@dataclass
class RunReconstruction:
    """``iresnet reconstruct``'s result: the :class:`Reconstruction` of the first test images,
    the picture ``path`` of originals beside reconstructions (not drawn where the inversion
    failed), and ``error``, why the picture could not be written."""

    reconstruction: Reconstruction
    path: Path
    error: OSError | None = None

    def table(self) -> str:
        """Each block's certified bound and iterations, and the failure, if any."""
        blocks = self.reconstruction.blocks
        columns = [_iteration_cells([block.iterations.get(method) for block in blocks]) for method in _METHODS]
        lines = [f"{'block':>5} {'certified Lip(g)':>17} {'fixed-point iterations':>23} {'Anderson iterations':>20}"]
        lines += [f"{i:>5} {b.bound:>17.4f} {columns[0][i]:>23} {columns[1][i]:>20}" for i, b in enumerate(blocks)]
        if self.reconstruction.images is None:
            lines.append(
                "the inversion failed, so the trunk cannot be inverted from its features: "
                f"{self.reconstruction.failure}"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        """Where the picture went, and the reconstruction's errors."""
        return (
            f"originals | reconstructions written to {self.path}\n"
            f"max abs error {self.reconstruction.max_error:.3g}, mean abs error {self.reconstruction.mean_error:.3g} "
            "(in intensity levels)"
        )


def _iteration_cells(counts: list[int | None]) -> list[str]:
    """Iteration counts per block; the trunk inverts from its last block to its first, so the last
    block without a count failed and the ones before it were not reached."""
    failed = max((i for i, c in enumerate(counts) if c is None), default=None)
    return [str(c) if c is not None else "failed" if i == failed else "not reached" for i, c in enumerate(counts)]


def reconstruct_run(
    run: str | os.PathLike, n: int = 16, *, out: str | os.PathLike | None = None, device: str = "auto"
) -> RunReconstruction:
    """``iresnet reconstruct``: the trunk of a trained classifier inverted from the features of
    its first ``n`` test images (:func:`reconstruct`), and, where the inversion succeeds, the
    originals beside the reconstructions written to ``out`` (default ``RUN/reconstructions.png``).
    ``ValueError`` for a run whose model is not a classifier."""
    resolved = resolve_device(device)
    model, config = load_run(run, resolved)
    if not isinstance(model, Classifier):
        raise ValueError(f"{run} holds a {config.task!r} run: reconstruct inverts a classifier's trunk")
    source = run_source(config).image_data()
    images = source.test[:n].to(resolved)
    done = RunReconstruction(
        reconstruct(model, images), Path(out) if out is not None else Path(run) / "reconstructions.png"
    )
    if done.reconstruction.images is None:
        return done
    shown = done.reconstruction.images.round().clamp(0, source.levels - 1).to(torch.uint8).cpu()
    scale, nrow = max(1, 64 // images.shape[-1]), math.ceil(math.sqrt(len(images)))
    try:
        plots.side_by_side(images.cpu(), shown, done.path, levels=source.levels, scale=scale, nrow=nrow)
    except OSError as error:
        done.error = error
    return done
