"""The pictures written at the end of a run: training curves for every run; the learned
density beside the data and samples beside data for 2-D runs; a grid of samples for images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..flows.density import DensityModel
from ..train.checkpoint import RunFiles
from ..train.sources import DataSource
from . import plots

__all__ = ["draw_run", "draw_samples", "run_pictures"]

_SAMPLE_SEED = 11


def draw_samples(
    model: DensityModel, source: DataSource, path, n: int, seed: int = _SAMPLE_SEED, *, by_class: bool = False
) -> torch.Tensor:
    """``n`` samples of ``model`` (eval mode, spectral norms converged) drawn with ``seed``,
    written to ``path``: a scatter beside the data for 2-D data, an image grid for images;
    ``by_class`` (a class-conditional prior): ``n`` samples of every class, a row each."""
    labels = torch.arange(len(model.class_means)).repeat_interleave(n) if by_class else None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        samples = model.sample(n if labels is None else len(labels), labels).cpu()
    if source.levels is None:
        plots.scatter_samples(samples, source.test[: max(n, 2000)].cpu(), path)
    else:
        images = samples.round().clamp(0, source.levels - 1).to(torch.uint8)
        scale = max(1, 64 // images.shape[-1])  # tiles of at least 64 pixels
        plots.image_grid(images, path, nrow=n if by_class else None, levels=source.levels, scale=scale)
    return samples


def run_pictures(
    model: nn.Module, source: DataSource, files: RunFiles, task: str = "density"
) -> dict[Path, Callable[[Path], object]]:
    """The pictures of a finished run: where each belongs, and the call that draws it to a path."""
    pictures: dict[Path, Callable[[Path], object]] = {
        files.root / "curves.png": lambda path: plots.training_curves(files.metrics, path)
    }
    if task == "classify":
        return pictures
    if task == "hybrid":
        model = model.density
    if source.levels is None:
        test = source.test.to(next(model.parameters()).device)
        pictures[files.root / "density.png"] = lambda path: plots.density_map(model, test, path)
        pictures[files.root / "samples.png"] = lambda path: draw_samples(model, source, path, 2000)
    else:
        pictures[files.root / "samples.png"] = lambda path: draw_samples(model, source, path, 64)
    return pictures


def draw_run(model: nn.Module, source: DataSource, files: RunFiles, task: str = "density") -> None:
    for path, draw in run_pictures(model, source, files, task).items():
        draw(path)
