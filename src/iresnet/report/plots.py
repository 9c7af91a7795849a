"""Pictures for the command line tool: model densities and samples of the toy 2-D data, image
grids, reconstructions, training curves and likelihood histograms, each written as a PNG.

Everything works headless: figures are ``matplotlib.figure.Figure`` objects drawn by the Agg
canvas, never registered with ``pyplot``, so nothing needs closing and no window opens.
matplotlib is imported inside the functions, so ``import iresnet`` does not import it.

Example:
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     canvas = image_grid(torch.zeros(5, 1, 4, 4), pathlib.Path(tmp) / "grid.png")
    >>> tuple(canvas.shape)  # 2 rows of 3 tiles of 4 x 4 pixels, 2-pixel grey padding between
    (10, 16, 3)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "density_map",
    "scatter_samples",
    "image_grid",
    "side_by_side",
    "read_metrics",
    "training_curves",
    "likelihood_histograms",
]

PathLike = str | os.PathLike

CHUNK_SIZE = 10_000
"""Grid points per call of ``log_prob`` in :func:`density_map`."""

HISTOGRAM_BINS = 40
"""Bins of :func:`likelihood_histograms`, shared by both sets."""

METRICS = ("nll", "bits_per_dim", "cross_entropy", "accuracy", "lr")
"""The fields of ``metrics.jsonl`` that :func:`training_curves` plots, in panel order."""

_DPI = 100
_GAP = 1  # pixels between tiles
_GAP_VALUE = 255  # gaps and empty slots are white
_SEPARATOR = 5  # pixels between the two grids of side_by_side
GRID_PADDING = 2
"""Pixels of :func:`image_grid` between neighbouring cells."""
GRID_PAD_VALUE = 128
"""The grey (each of R, G, B) of :func:`image_grid`'s padding and empty cells: neutral between a
black background and white strokes, so that cells of either kind stay apart."""


def _figure(width: float, height: float, constrained: bool = False) -> Figure:
    """A figure drawn by the Agg canvas, unknown to pyplot (garbage collected like any object)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=_DPI)


def _check_points(points: Tensor, name: str) -> None:
    if not isinstance(points, Tensor) or points.dim() != 2 or points.shape[1] != 2 or points.shape[0] == 0:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"{name} must be a tensor of shape (N, 2) with N >= 1, got {shape}")
    if not points.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {points.dtype}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError(f"{name} holds NaN or inf")


def _two_panels(title: str | None, labels: tuple[str, str]) -> tuple[Figure, list]:
    """A figure with two square panels side by side, without ticks, each with its label above and
    ``title`` above both when given."""
    height = 4.2 + (0.4 if title else 0.0)  # 3.75 in panels, 0.35 in labels, 0.4 in the title
    figure = _figure(8, height)
    top = 1 - (0.35 + (0.4 if title else 0.0)) / height
    panels = figure.subplots(1, 2, gridspec_kw=dict(left=0.02, right=0.98, bottom=0.1 / height, top=top, wspace=0.05))
    for axes, label in zip(panels, labels):
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title(label)
    if title:
        figure.suptitle(title)
    return figure, list(panels)


def _square(data: Tensor, bounds: tuple[float, float] | None) -> tuple[float, float]:
    """``bounds`` checked, or the symmetric square holding the data with a 10% margin."""
    if bounds is None:
        radius = 1.1 * float(data.detach().abs().max())
        radius = radius if radius > 0 else 1.0
        return -radius, radius
    lo, hi = float(bounds[0]), float(bounds[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"bounds must be finite with lo < hi, got {bounds}")
    return lo, hi


def _grid_axes(
    lo: float, hi: float, resolution: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Cell centres: x from left to right, y from top to bottom."""
    step = (hi - lo) / resolution
    centres = torch.arange(resolution, dtype=torch.float64) * step + (lo + step / 2)
    return centres.to(dtype=dtype, device=device), centres.flip(0).to(dtype=dtype, device=device)


def density_map(
    log_prob: Callable[[Tensor], Tensor],
    data: Tensor,
    path: PathLike,
    *,
    bounds: tuple[float, float] | None = None,
    resolution: int = 200,
    title: str | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> Tensor:
    """Draw the model density ``exp(log_prob)`` beside a histogram of ``data`` (N, 2) on the
    square ``[lo, hi]^2`` (``bounds``; default: symmetric, holding the data with a 10% margin)
    and write the PNG to ``path``.

    The square is cut into ``resolution`` x ``resolution`` cells, the histogram's bins;
    ``log_prob`` is evaluated at the cell centres, under ``torch.no_grad``, in chunks of at
    most ``chunk_size`` points of shape (chunk, 2), in the dtype and on the device of
    ``data``. Returns the densities, a (resolution, resolution) tensor on the CPU oriented like
    the picture: row ``i`` has y = hi - (i + 1/2) h (top row: largest y) and column ``j`` has
    x = lo + (j + 1/2) h, with h = (hi - lo) / resolution. NaN from ``log_prob`` stays NaN
    (drawn blank).
    """
    _check_points(data, "data")
    if resolution < 1 or chunk_size < 1:
        raise ValueError(f"resolution and chunk_size must be positive, got {resolution} and {chunk_size}")
    lo, hi = _square(data, bounds)
    xs, ys = _grid_axes(lo, hi, resolution, data.dtype, data.device)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).reshape(-1, 2)  # row-major, (x, y)
    values = []
    with torch.no_grad():
        for chunk in grid.split(chunk_size):
            out = log_prob(chunk)
            if not isinstance(out, Tensor) or out.numel() != chunk.shape[0]:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"log_prob must return one value per point, shape ({chunk.shape[0]},); got {got}")
            values.append(out.reshape(-1).exp().cpu())
    density = torch.cat(values).reshape(resolution, resolution)

    points = data.detach().cpu().double().numpy()
    edges = np.linspace(lo, hi, resolution + 1)
    counts, _, _ = np.histogram2d(points[:, 0], points[:, 1], bins=(edges, edges))  # counts[x bin, y bin]
    histogram = counts.T[::-1] / (len(points) * ((hi - lo) / resolution) ** 2)  # rows: y from the top

    figure, panels = _two_panels(title, ("model density", "data"))
    for axes, image in zip(panels, (density.double().numpy(), histogram)):
        axes.imshow(image, extent=(lo, hi, lo, hi), origin="upper", interpolation="nearest", cmap="viridis")
        axes.set_axis_off()
    _save(figure, path)
    return density


def scatter_samples(
    samples: Tensor,
    data: Tensor,
    path: PathLike,
    *,
    bounds: tuple[float, float] | None = None,
    title: str | None = None,
) -> None:
    """Scatter the model's ``samples`` (M, 2) beside ``data`` (N, 2), both panels on the square
    ``[lo, hi]^2`` (default: from the data, as in :func:`density_map`), and write the PNG to
    ``path``. Samples outside the square are not shown."""
    _check_points(data, "data")
    if not isinstance(samples, Tensor) or samples.dim() != 2 or samples.shape[1] != 2:
        raise ValueError(f"samples must be a tensor of shape (M, 2), got {getattr(samples, 'shape', samples)}")
    lo, hi = _square(data, bounds)
    figure, panels = _two_panels(title, ("model samples", "data"))
    for axes, points, colour in zip(panels, (samples, data), ("tab:red", "tab:blue")):
        xy = points.detach().cpu().double().numpy()
        axes.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.5, color=colour, linewidths=0)
        axes.set_xlim(lo, hi)
        axes.set_ylim(lo, hi)
        axes.set_aspect("equal")
    _save(figure, path)


def _to_uint8(images: Tensor, levels: int, name: str = "images") -> Tensor:
    """(N, C, H, W), C in {1, 3}, as uint8 RGB (N, H, W, 3) on the CPU."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must have shape (N, C, H, W) with N >= 1 and C in {{1, 3}}, got {shape}")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name} must have positive height and width, got {tuple(images.shape)}")
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    values = images.detach().cpu()
    if values.is_floating_point():
        values = values.double()
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name} holds NaN or inf")
        scaled = values.clamp(0, 1) * 255
    else:
        values = values.long()
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > levels - 1:
            raise ValueError(f"integer {name} must lie in [0, {levels - 1}], got values in [{low}, {high}]")
        scaled = values.double() * (255 / (levels - 1))
    rgb = scaled.round().to(torch.uint8).expand(-1, 3, -1, -1)
    return rgb.permute(0, 2, 3, 1)


def _tile(tiles: Tensor, ncol: int, gap: int = _GAP, value: int = _GAP_VALUE) -> Tensor:
    """Place (N, H, W, 3) tiles row by row, ``ncol`` to a row, with ``gap`` pixels of grey
    ``value`` between (and in the empty slots)."""
    n, height, width, _ = tiles.shape
    nrows = math.ceil(n / ncol)
    canvas = torch.full(
        (nrows * height + (nrows - 1) * gap, ncol * width + (ncol - 1) * gap, 3), value, dtype=torch.uint8
    )
    for k in range(n):
        top, left = (k // ncol) * (height + gap), (k % ncol) * (width + gap)
        canvas[top : top + height, left : left + width] = tiles[k]
    return canvas


def _write_png(canvas: Tensor, path: PathLike) -> None:
    from matplotlib.image import imsave

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, canvas.numpy(), format="png")


def image_grid(
    images: Tensor,
    path: PathLike,
    *,
    nrow: int | None = None,
    levels: int = 256,
    scale: int = 1,
    padding: int = GRID_PADDING,
    pad_value: int = GRID_PAD_VALUE,
) -> Tensor:
    """Write ``images`` (N, C, H, W) as one PNG of tiles, ``nrow`` images to a row (default
    ceil(sqrt(N))), filled row by row, ``padding`` pixels of grey ``pad_value`` (0-255) between
    cells and in the empty ones; returns the uint8 canvas that was written, on the CPU:
    (r s H + (r - 1) p, c s W + (c - 1) p, 3) for r rows, c = min(nrow, N) columns, scale s and
    padding p.

    C = 1 is grey, C = 3 is RGB. Integer images hold levels in [0, levels - 1] (mapped to
    round(255 k / (levels - 1))), floating point ones values in [0, 1] (clamped, mapped to
    round(255 v)). Each image pixel becomes ``scale`` x ``scale`` output pixels. Raises
    ``ValueError`` for other shapes, for integers outside the levels and for NaN or inf.
    """
    tiles = _to_uint8(images, levels)
    if nrow is None:
        nrow = math.ceil(math.sqrt(tiles.shape[0]))
    if nrow < 1 or scale < 1:
        raise ValueError(f"nrow and scale must be positive, got {nrow} and {scale}")
    if padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(f"padding must be >= 0 and pad_value in [0, 255], got {padding} and {pad_value}")
    tiles = tiles.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    canvas = _tile(tiles, min(nrow, tiles.shape[0]), padding, pad_value)
    _write_png(canvas, path)
    return canvas


def side_by_side(
    left: Tensor, right: Tensor, path: PathLike, *, levels: int = 256, scale: int = 1, nrow: int = 1
) -> Tensor:
    """Write two image sets of one shape (N, C, H, W) as one PNG: a grid of ``left`` beside the
    same grid of ``right`` (e.g. originals | reconstructions), ``nrow`` images to a row of each,
    1-pixel white gaps within a grid and ``_SEPARATOR`` pixels between the two; returns the
    uint8 canvas, on the CPU: (N H + N - 1, 2 W + _SEPARATOR, 3) for ``nrow=1`` (times ``scale``
    without the gaps). Value conventions as in :func:`image_grid`."""
    if not (isinstance(left, Tensor) and isinstance(right, Tensor)) or left.shape != right.shape:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (left, right)]
        raise ValueError(f"left and right must be tensors of the same shape, got {shapes[0]} and {shapes[1]}")
    if scale < 1 or nrow < 1:
        raise ValueError(f"scale and nrow must be positive, got {scale} and {nrow}")
    grids = []
    for images, name in ((left, "left"), (right, "right")):
        tiles = _to_uint8(images, levels, name).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        grids.append(_tile(tiles, min(nrow, tiles.shape[0])))
    separator = torch.full((grids[0].shape[0], _SEPARATOR, 3), _GAP_VALUE, dtype=torch.uint8)
    canvas = torch.cat([grids[0], separator, grids[1]], 1)
    _write_png(canvas, path)
    return canvas


def read_metrics(metrics_path: PathLike) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Read ``metrics.jsonl``: ``{metric: {split: (steps, values)}}`` for the fields of
    :data:`METRICS` present, sorted by step. Every non-blank line must be a JSON object with an
    integer ``"step"`` and a string ``"split"``; a metric may be missing or null, other fields
    are ignored. Raises ``ValueError`` naming the line number of a malformed line."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    with open(metrics_path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            where = f"{metrics_path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            step, split = record.get("step"), record.get("split")
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError(f"{where}: 'step' must be an integer, got {step!r}")
            if not isinstance(split, str):
                raise ValueError(f"{where}: 'split' must be a string such as 'train' or 'test', got {split!r}")
            for metric in METRICS:
                value = record.get(metric)
                if value is None:
                    continue
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ValueError(f"{where}: {metric!r} must be a number, got {value!r}")
                series.setdefault(metric, {}).setdefault(split, []).append((step, float(value)))
    result: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for metric in METRICS:
        if metric in series:
            result[metric] = {}
            for split, pairs in series[metric].items():
                pairs.sort(key=lambda pair: pair[0])
                result[metric][split] = ([step for step, _ in pairs], [value for _, value in pairs])
    return result


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over ``window`` values (fewer near the ends), skipping NaN and inf."""
    finite = np.isfinite(values)
    sums = np.cumsum(np.concatenate([[0.0], np.where(finite, values, 0.0)]))
    counts = np.cumsum(np.concatenate([[0], finite]))
    index = np.arange(len(values))
    starts = np.maximum(index - window // 2, 0)
    ends = np.minimum(index - window // 2 + window, len(values))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums[ends] - sums[starts]) / (counts[ends] - counts[starts])


def training_curves(metrics_path: PathLike, path: PathLike) -> None:
    """Plot ``metrics.jsonl`` (see :func:`read_metrics`) and write the PNG to ``path``: one
    panel per metric present (``bits_per_dim`` replaces ``nll`` when present), value against
    step, one line per split: train thin, with a running mean over a twentieth of its points on
    top (not for ``lr``); other splits (test) with markers. ``lr`` uses a log scale when positive
    and spanning more than a factor 10. Raises ``ValueError`` for a malformed line or when no
    line holds a metric."""
    metrics = read_metrics(metrics_path)
    if "bits_per_dim" in metrics:
        metrics.pop("nll", None)
    if not metrics:
        raise ValueError(f"{metrics_path}: no line holds any of the metrics {', '.join(METRICS)}")
    labels = {
        "nll": "nll (nats)",
        "bits_per_dim": "bits per dim",
        "cross_entropy": "cross-entropy (nats)",
        "accuracy": "accuracy",
        "lr": "learning rate",
    }
    figure = _figure(4 * len(metrics), 3.2, constrained=True)
    panels = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axes, (metric, splits) in zip(panels, metrics.items()):
        for split, (steps, values) in sorted(splits.items(), key=lambda item: item[0] != "train"):
            x, y = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
            if split == "train":
                window = 1 if metric == "lr" else max(1, len(y) // 20)
                if window > 1:
                    axes.plot(x, y, linewidth=0.5, alpha=0.35, color="tab:blue")
                    axes.plot(x, _running_mean(y, window), linewidth=1.2, color="tab:blue", label="train")
                else:
                    marker = "o" if len(y) == 1 else None
                    axes.plot(x, y, linewidth=0.8, marker=marker, markersize=3, color="tab:blue", label="train")
            else:
                colour = "tab:orange" if split == "test" else None
                axes.plot(x, y, marker="o", markersize=3, linewidth=1, color=colour, label=split)
        all_values = [value for _, values in splits.values() for value in values]
        finite = [value for value in all_values if math.isfinite(value)]
        if metric == "lr" and finite and min(finite) > 0 and max(finite) > 10 * min(finite):
            axes.set_yscale("log")
        axes.set_xlabel("step")
        axes.set_title(labels[metric])
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    _save(figure, path)


def _values(values: Tensor, name: str) -> np.ndarray:
    """A non-empty 1-D tensor of finite numbers as float64 NumPy."""
    array = torch.as_tensor(values).detach().cpu().double().numpy()
    if array.ndim != 1 or len(array) == 0 or not np.isfinite(array).all():
        raise ValueError(f"{name} must be a non-empty 1-D tensor of finite values, got shape {array.shape}")
    return array


def likelihood_histograms(
    in_bpd: Tensor, out_bpd: Tensor, labels: tuple[str, str], auroc: float, *, path: PathLike | None = None
) -> Figure:
    """Overlaid histograms of the bits/dim of each example of two sets (in distribution, out of
    distribution) on :data:`HISTOGRAM_BINS` bins spanning both, as fractions of each set so that
    sets of different sizes compare; ``labels`` name the sets in the legend and ``auroc`` goes in
    the title. Returns the figure, also written as a PNG to ``path`` when given."""
    sets = _values(in_bpd, "in_bpd"), _values(out_bpd, "out_bpd")
    edges = np.histogram_bin_edges(np.concatenate(sets), bins=HISTOGRAM_BINS).tolist()  # as matplotlib types bins
    figure = _figure(6, 3.6, constrained=True)
    axes = figure.subplots()
    for values, label, colour in zip(sets, labels, ("tab:blue", "tab:orange")):
        weights = np.full(len(values), 1 / len(values))
        axes.hist(values, bins=edges, weights=weights, alpha=0.55, color=colour, label=f"{label} ({len(values)})")
    axes.set_xlabel("bits/dim")
    axes.set_ylabel("fraction of examples")
    axes.set_title(f"AUROC {auroc:.4f} (in distribution = higher likelihood)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    if path is not None:
        _save(figure, path)
    return figure
