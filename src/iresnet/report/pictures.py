"""The pictures of a run: those written once its training is complete (training curves for
every run; where its task's model holds a flow, the learned density beside the data and samples
beside data for 2-D data, a grid of samples for images), and samples on demand (``iresnet
sample``)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..core.lipschitz import converge_spectral_norms
from ..flows.density import DensityModel, check_temperature
from ..tasks import TASKS, get_task, listed
from ..train.checkpoint import load_run
from ..train.distributed import resolve_device
from ..train.sources import run_source
from . import plots

if TYPE_CHECKING:
    from ..tasks import Task
    from ..train.checkpoint import RunFiles
    from ..train.engine import FinishedRun
    from ..train.sources import DataSource

__all__ = ["Samples", "draw_samples", "run_pictures", "sample_run", "sidecar_path", "write_final_files"]

_SAMPLE_SEED = 11


def draw_samples(
    model: DensityModel,
    source: DataSource,
    path,
    n: int,
    seed: int = _SAMPLE_SEED,
    *,
    by_class: bool = False,
    temperature: float = 1.0,
) -> Tensor:
    """``n`` samples of ``model`` (eval mode, spectral norms converged) drawn with ``seed`` at
    ``temperature`` (the prior's scale times it, :meth:`DensityModel.sample`), written to
    ``path``: a scatter beside the data for 2-D data, an image grid for images; ``by_class`` (a
    class-conditional prior): ``n`` samples of every class, a row each."""
    labels = None
    if by_class:
        if model.class_means is None:
            raise ValueError("samples by class need a class-conditional prior (class_means)")
        labels = torch.arange(len(model.class_means)).repeat_interleave(n)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        samples = model.sample(n if labels is None else len(labels), labels, temperature=temperature).cpu()
    if not source.is_image:
        plots.scatter_samples(samples, source.test[: max(n, 2000)].cpu(), path)
    else:
        levels = source.image_data().levels
        images = samples.round().clamp(0, levels - 1).to(torch.uint8)
        scale = max(1, 64 // images.shape[-1])  # tiles of at least 64 pixels
        plots.image_grid(images, path, nrow=n if by_class else None, levels=levels, scale=scale)
    return samples


def run_pictures(
    model: nn.Module, source: DataSource, files: RunFiles, task: Task
) -> dict[Path, Callable[[Path], object]]:
    """The pictures of a finished run: where each belongs, and the call that draws it to a path."""
    pictures: dict[Path, Callable[[Path], object]] = {
        files.root / "curves.png": lambda path: plots.training_curves(files.metrics, path)
    }
    flow = task.flow(model)
    if flow is None:
        return pictures
    if source.is_image:
        pictures[files.root / "samples.png"] = lambda path: draw_samples(flow, source, path, 64)
    else:
        test = source.test.to(next(flow.parameters()).device)
        pictures[files.root / "density.png"] = lambda path: plots.density_map(flow, test, path)
        pictures[files.root / "samples.png"] = lambda path: draw_samples(flow, source, path, 2000)
    return pictures


def write_final_files(run: FinishedRun) -> None:
    """The final step of ``iresnet train`` (``train(config, finish=write_final_files)``): the
    evaluation weights, then the pictures, each drawn to a partial file, then renamed. A picture
    that cannot be drawn (a diverged model) is reported and skipped: the run itself is complete."""
    print(f"writing the evaluation weights and the pictures to {run.files.root}", flush=True)
    pictures = run_pictures(run.model, run.source, run.files, run.task)
    run.unwritten += [path.name for path in pictures]
    run.save_weights()
    for path, draw in pictures.items():
        partial = path.with_name(f".{path.stem}.partial{path.suffix}")
        try:
            draw(partial)
            os.replace(partial, path)
            run.unwritten.remove(path.name)
        except Exception as error:  # reported; the run stays complete
            print(f"iresnet: {path.name} was not drawn: {error}", file=sys.stderr)
        finally:
            partial.unlink(missing_ok=True)


@dataclass
class Samples:
    """Samples drawn at ``temperature`` for the picture ``path`` (``error``: why it or its
    sidecar could not be written); ``classes``: drawn for each class of that many, a row each."""

    samples: Tensor
    path: Path
    classes: int | None = None
    error: OSError | None = None
    temperature: float = 1.0

    @property
    def sidecar(self) -> Path:
        """``PATH.json``, beside the picture: how it was drawn (:func:`sample_run`)."""
        return sidecar_path(self.path)

    def __str__(self) -> str:
        rows = f", a row for each of the {self.classes} classes" if self.classes else ""
        return f"{len(self.samples)} samples at temperature {self.temperature:g} written to {self.path}{rows}"


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON file beside the picture ``path``: ``samples.png`` -> ``samples.png.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def sample_run(
    run: str | os.PathLike,
    n: int = 64,
    *,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    by_class: bool = False,
    device: str = "auto",
    temperature: float = 1.0,
) -> Samples:
    r"""``iresnet sample``: ``n`` samples of a trained run's flow (``by_class``: ``n`` of every
    class of a class-conditional prior) drawn with ``seed`` at ``temperature`` :math:`T` (the
    latent :math:`z \sim N(\mu, (T \sigma)^2)`, then :math:`x = f^{-1}(z)`), written to ``out``
    (default ``RUN/samples.png``). ``ValueError`` for a run without a flow, ``by_class``
    without such a prior, or :math:`T \le 0`.

    Beside the picture, ``PATH.json`` holds ``temperature``, ``n``, ``seed``, ``by_class`` and
    ``run``: a JSON sidecar rather than PNG text chunks, since any tool (or ``json.load``) reads
    it without a PNG library, and the picture stays written as every other picture of a run."""
    check_temperature(temperature)
    path = Path(out) if out is not None else Path(run) / "samples.png"
    if path.suffix.lower() != ".png":  # before the run is loaded
        raise ValueError(f"--out {path}: samples are written as PNG: name a .png file")
    model, config = load_run(run, resolve_device(device))
    flow = get_task(config.task).flow(model)
    if flow is None:
        samplers = listed([name for name, task in TASKS.items() if task.generative])
        raise ValueError(f"{run} holds a {config.task!r} run: only {samplers} models can be sampled")
    if by_class and flow.class_means is None:
        raise ValueError("--by-class needs a hybrid with a class-conditional prior (model.classifier=gaussians)")
    converge_spectral_norms(flow)
    classes = len(flow.class_means) if by_class and flow.class_means is not None else None
    source = run_source(config)
    try:
        samples = draw_samples(flow, source, path, n, seed, by_class=by_class, temperature=temperature)
    except OSError as error:
        return Samples(torch.empty(0), path, classes, error, temperature)
    done = Samples(samples, path, classes, temperature=temperature)
    about = {"temperature": float(temperature), "n": n, "seed": seed, "by_class": by_class, "run": str(run)}
    try:
        done.sidecar.write_text(json.dumps(about, indent=2) + "\n")
    except OSError as error:
        done.path, done.error = done.sidecar, error
    return done
