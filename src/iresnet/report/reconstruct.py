"""Inverting a trained classifier's trunk from its final features back to the input: the
reconstruction error, the cost of the fixed-point and Anderson inversions per block, and each
block's certified Lipschitz bound (Behrmann et al., 2019, section 5); and an image flow's test
images mapped to the latent and back, rounded to levels."""

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
from ..flows.density import DensityModel
from ..models.classifier import Classifier
from ..tasks import evaluation_randomness, get_task
from ..train.checkpoint import load_run
from ..train.distributed import resolve_device
from ..train.sources import run_source
from . import plots
from .card import BlockCertificate, block_certificates, round_trip

__all__ = [
    "BlockReport",
    "FlowReconstruction",
    "Reconstruction",
    "RunReconstruction",
    "reconstruct",
    "reconstruct_flow",
    "reconstruct_run",
]

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


@dataclass
class FlowReconstruction:
    """An image flow's test images mapped to the latent and inverted back (:func:`reconstruct_flow`):
    the reconstructions rounded to levels (``None`` where the inverse failed, ``failure`` saying
    why), how many images and what fraction of pixels came back exactly, the largest error in
    levels, the absolute error before rounding (in the dequantised space) and each block's
    certificate and inverse iterations. A pixel whose dequantised value lies within the inverse's
    error of its cell's edge may round into the next cell."""

    images: Tensor | None
    exact: int
    pixels_exact: float
    max_level_error: int
    max_error: float | None
    mean_error: float | None
    blocks: list[BlockCertificate]
    failure: str | None = None


@torch.no_grad()
def reconstruct_flow(model: DensityModel, images: Tensor) -> FlowReconstruction:
    """``images`` (integer levels) dequantised, mapped to the latent by ``model`` and inverted
    back by each block's own inverse method, in eval mode with spectral norms converged
    (:func:`~iresnet.report.card.round_trip`), then rounded to levels."""
    try:
        x, reconstruction, dequantisers = round_trip(model, images)
    except InversionError as error:
        return FlowReconstruction(None, 0, 0.0, 0, None, None, block_certificates(model), str(error))
    recovered = dequantisers.inverse(reconstruction)
    same = (recovered == images.to(recovered)).flatten(1)
    level_error = int((recovered - images.to(recovered)).abs().max())
    difference = (reconstruction - x).abs()
    return FlowReconstruction(
        recovered,
        int(same.all(1).sum()),
        same.double().mean().item(),
        level_error,
        difference.max().item(),
        difference.mean().item(),
        block_certificates(model),
    )


@dataclass
class FlowRunReconstruction:
    """``iresnet reconstruct`` on an image flow: the :class:`FlowReconstruction` of the first test
    images, the picture ``path`` of originals beside reconstructions (not drawn where the
    inversion failed), and ``error``, why the picture could not be written."""

    reconstruction: FlowReconstruction
    path: Path
    error: OSError | None = None

    def table(self) -> str:
        """Each block's certified bound against its design and the iterations of its inverse."""
        lines = [f"{'block':>5}  {'kind':<12} {'certified Lip(g)':>16} {'design':>8} {'iterations':>10}"]
        for b in self.reconstruction.blocks:
            design = "-" if b.design is None else f"{b.design:.4f}"
            iterations = "-" if b.iterations is None else str(b.iterations)
            lines.append(f"{b.index:>5}  {b.kind:<12} {b.certified:>16.4f} {design:>8} {iterations:>10}")
        if self.reconstruction.images is None:
            lines.append(f"the inverse failed: {self.reconstruction.failure}")
        return "\n".join(lines)

    def summary(self) -> str:
        """Where the picture went, how many images and pixels came back exactly, and the error before rounding."""
        done = self.reconstruction
        n = 0 if done.images is None else len(done.images)
        return (
            f"originals | reconstructions written to {self.path}\n"
            f"{done.exact} of {n} images and {100 * done.pixels_exact:.2f}% of their pixels recovered exactly in "
            f"levels, the others off by at most {done.max_level_error} (a value within the inverse's error of a "
            f"cell's edge rounds into the next); before rounding, max abs error {done.max_error:.3g}, mean "
            f"{done.mean_error:.3g} (in the dequantised space)"
        )


def reconstruct_run(
    run: str | os.PathLike, n: int = 16, *, out: str | os.PathLike | None = None, device: str = "auto"
) -> RunReconstruction | FlowRunReconstruction:
    """``iresnet reconstruct``: the trunk of a trained classifier inverted from the features of
    its first ``n`` test images (:func:`reconstruct`), or an image flow's (a hybrid's too) first
    ``n`` test images mapped to the latent and back (:func:`reconstruct_flow`); where the
    inversion succeeds, the originals beside the reconstructions written to ``out`` (default
    ``RUN/reconstructions.png``).
    ``ValueError`` for a run that is neither."""
    resolved = resolve_device(device)
    model, config = load_run(run, resolved)
    source = run_source(config)
    flow = None if isinstance(model, Classifier) else get_task(config.task).flow(model)
    if not (isinstance(model, Classifier) or (isinstance(flow, DensityModel) and source.is_image)):
        raise ValueError(
            f"{run} holds a {config.task!r} run on {config.data!r}: reconstruct inverts a classifier's trunk or "
            "an image flow"
        )
    data = source.image_data()
    images = data.test[:n].to(resolved)
    path = Path(out) if out is not None else Path(run) / "reconstructions.png"
    done: RunReconstruction | FlowRunReconstruction
    if isinstance(model, Classifier):
        done = RunReconstruction(reconstruct(model, images), path)
    else:
        with evaluation_randomness(resolved):
            done = FlowRunReconstruction(reconstruct_flow(cast(DensityModel, flow), images), path)
    if done.reconstruction.images is None:
        return done
    shown = done.reconstruction.images.round().clamp(0, data.levels - 1).to(torch.uint8).cpu()
    scale, nrow = max(1, 64 // images.shape[-1]), math.ceil(math.sqrt(len(images)))
    try:
        plots.side_by_side(images.cpu(), shown, done.path, levels=data.levels, scale=scale, nrow=nrow)
    except OSError as error:
        done.error = error
    return done
