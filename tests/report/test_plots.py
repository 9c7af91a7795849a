"""The PNG writers of ``iresnet.report.plots``: densities against exact values and orientation, tile
positions read back from the files, metrics parsing, and no figure left alive."""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iresnet.report import plots


def _gaussian_log_prob(mean: tuple[float, float], std: float = 1.0):
    def log_prob(x: torch.Tensor) -> torch.Tensor:
        centre = torch.tensor(mean, dtype=x.dtype, device=x.device)
        return -((x - centre) ** 2).sum(-1) / (2 * std**2) - math.log(2 * math.pi * std**2)

    return log_prob


def _exact_density(x: float, y: float, mean: tuple[float, float], std: float = 1.0) -> float:
    return math.exp(-((x - mean[0]) ** 2 + (y - mean[1]) ** 2) / (2 * std**2)) / (2 * math.pi * std**2)


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _yellowest(panel: np.ndarray) -> tuple[float, float]:
    """Relative (x from left, y from top) of the brightest viridis pixel inside the image area."""
    rgb = panel.astype(int)
    coloured = (rgb < 250).any(-1)
    rows, cols = np.flatnonzero(coloured.sum(1) > 200), np.flatnonzero(coloured.sum(0) > 200)  # not the titles
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    score = rgb[..., 0] + rgb[..., 1] - rgb[..., 2]
    row, col = np.unravel_index(score.argmax(), score.shape)
    return (col - left) / (right - left), (row - top) / (bottom - top)


def test_density_map_standard_gaussian_peaks_at_the_centre(tmp_path: Path, device: torch.device) -> None:
    data = torch.randn(300, 2, dtype=torch.float64, device=device)
    density = plots.density_map(_gaussian_log_prob((0.0, 0.0)), data, tmp_path / "d.png", bounds=(-3, 3), resolution=51)
    assert density.shape == (51, 51) and density.device.type == "cpu" and density.dtype == torch.float64
    assert divmod(int(density.argmax()), 51) == (25, 25)
    assert density[25, 25].item() == pytest.approx(1 / (2 * math.pi), rel=1e-12)
    assert torch.allclose(density, density.flip(0)) and torch.allclose(density, density.T)


def test_density_map_orientation_matches_exact_values_and_picture(tmp_path: Path, device: torch.device) -> None:
    mean, std = (1.0, -2.0), 0.3
    data = (torch.tensor(mean) + std * torch.randn(5000, 2)).double().to(device)
    # h = 0.2: column j has x = -4 + 0.2 j, row i has y = 4 - 0.2 i, so the mean is at row 30, column 25
    density = plots.density_map(
        _gaussian_log_prob(mean, std), data, tmp_path / "d.png", bounds=(-4.1, 4.1), resolution=41, title="shifted"
    )
    assert divmod(int(density.argmax()), 41) == (30, 25)
    for i, j in [(30, 25), (29, 26), (0, 0), (32, 20), (40, 40), (28, 27)]:
        x, y = -4 + 0.2 * j, 4 - 0.2 * i
        assert density[i, j].item() == pytest.approx(_exact_density(x, y, mean, std), rel=1e-9, abs=1e-300)

    picture = _read_rgb(tmp_path / "d.png")
    assert picture.shape == (460, 800, 3) and len(np.unique(picture.reshape(-1, 3), axis=0)) > 50
    expected = ((1 + 4.1) / 8.2, (4.1 + 2) / 8.2)
    for half in (picture[:, :400], picture[:, 400:]):  # the model's density, then the data's histogram
        assert np.allclose(_yellowest(half), expected, atol=0.06)


def test_density_map_calls_log_prob_in_bounded_chunks_without_grad(tmp_path: Path, device: torch.device) -> None:
    data = torch.randn(100, 2, device=device)
    calls = []

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape, x.dtype, x.device.type, torch.is_grad_enabled(), x.clone()))
        return _gaussian_log_prob((0.0, 0.0))(x)

    plots.density_map(log_prob, data, tmp_path / "a.png", resolution=150)
    assert _read_rgb(tmp_path / "a.png").shape == (420, 800, 3)
    assert [shape for shape, *_ in calls] == [(10_000, 2), (10_000, 2), (2_500, 2)]
    assert all(dtype == torch.float32 and kind == device.type and not grad for _, dtype, kind, grad, _ in calls)
    points = torch.cat([x for *_, x in calls]).cpu().double()
    radius = 1.1 * data.abs().max().item()  # default square: symmetric, 10% margin
    half_cell = radius / 150
    assert points.min().item() == pytest.approx(-radius + half_cell, rel=1e-5)
    assert points.max().item() == pytest.approx(radius - half_cell, rel=1e-5)

    calls.clear()
    plots.density_map(log_prob, data, tmp_path / "b.png", resolution=40, chunk_size=333)
    assert max(shape[0] for shape, *_ in calls) <= 333 and sum(shape[0] for shape, *_ in calls) == 1600


def test_density_map_rejects_bad_input(tmp_path: Path) -> None:
    log_prob = _gaussian_log_prob((0.0, 0.0))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plots.density_map(log_prob, torch.randn(10, 3), tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        plots.density_map(log_prob, torch.tensor([[0.0, float("nan")]]), tmp_path / "x.png")
    with pytest.raises(ValueError, match="bounds"):
        plots.density_map(log_prob, torch.randn(10, 2), tmp_path / "x.png", bounds=(1, -1))
    with pytest.raises(ValueError, match="one value per point"):
        plots.density_map(lambda x: x, torch.randn(10, 2), tmp_path / "x.png", resolution=10)


def test_scatter_samples_draws_model_left_and_data_right(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "s.png"
    assert plots.scatter_samples(torch.randn(2000, 2), torch.randn(2000, 2) + 1, path, title="t") is None
    picture = _read_rgb(path).astype(int)
    assert picture.shape == (460, 800, 3)
    reddish = picture[..., 0] > picture[..., 2] + 40
    bluish = picture[..., 2] > picture[..., 0] + 40
    assert reddish[:, :400].sum() > 500 and reddish[:, 400:].sum() == 0
    assert bluish[:, 400:].sum() > 500 and bluish[:, :400].sum() == 0


def test_image_grid_places_grey_tiles_row_by_row(tmp_path: Path, device: torch.device) -> None:
    images = (10 * torch.arange(5)).view(5, 1, 1, 1).expand(5, 1, 3, 4).to(device)  # image k filled with 10 k
    canvas = plots.image_grid(images, tmp_path / "g.png")  # nrow = ceil(sqrt(5)) = 3: 2 rows of 3, 2-px padding
    assert canvas.dtype == torch.uint8 and canvas.device.type == "cpu" and canvas.shape == (2 * 3 + 2, 3 * 4 + 4, 3)
    expected = np.full((8, 16, 3), plots.GRID_PAD_VALUE, dtype=np.uint8)
    for k in range(5):
        top, left = (k // 3) * 5, (k % 3) * 6
        expected[top : top + 3, left : left + 4] = 10 * k
    assert np.array_equal(canvas.numpy(), expected)
    assert np.array_equal(_read_rgb(tmp_path / "g.png"), expected)

    assert plots.image_grid(images, tmp_path / "h.png", nrow=2).shape == (3 * 3 + 2 * 2, 2 * 4 + 2, 3)
    assert plots.image_grid(images, tmp_path / "i.png", nrow=9).shape == (3, 5 * 4 + 4 * 2, 3)
    scaled = plots.image_grid(images[:1], tmp_path / "j.png", scale=3)
    assert scaled.shape == (9, 12, 3) and _read_rgb(tmp_path / "j.png").shape == (9, 12, 3)


@pytest.mark.parametrize("n, nrow, scale, padding", [(64, None, 8, 2), (7, 3, 1, 1), (10, 4, 2, 0), (1, None, 3, 2)])
def test_padded_grid_size_and_padding_colour(
    n: int, nrow: int | None, scale: int, padding: int, tmp_path: Path
) -> None:
    """(r s H + (r - 1) p, c s W + (c - 1) p): every pixel outside the cells is the padding grey,
    between white tiles too (the digits' strokes), so that neighbours never run into each other."""
    height, width = 8, 5
    images = torch.ones(n, 1, height, width)  # white tiles
    canvas = plots.image_grid(images, tmp_path / "p.png", nrow=nrow, scale=scale, padding=padding, pad_value=100)
    cols = min(nrow or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / cols)
    shape = (rows * scale * height + (rows - 1) * padding, cols * scale * width + (cols - 1) * padding, 3)
    assert canvas.shape == shape and _read_rgb(tmp_path / "p.png").shape == shape
    inside = torch.zeros(shape[:2], dtype=torch.bool)
    for k in range(n):
        top, left = (k // cols) * (scale * height + padding), (k % cols) * (scale * width + padding)
        inside[top : top + scale * height, left : left + scale * width] = True
    assert int(inside.sum()) == n * scale * scale * height * width
    assert (canvas[inside] == 255).all() and (canvas[~inside] == 100).all()
    with pytest.raises(ValueError, match="padding"):
        plots.image_grid(images, tmp_path / "bad.png", padding=-1)
    with pytest.raises(ValueError, match="pad_value"):
        plots.image_grid(images, tmp_path / "bad.png", pad_value=256)


def test_default_padding_is_two_grey_pixels(tmp_path: Path) -> None:
    canvas = plots.image_grid(torch.ones(4, 1, 3, 3), tmp_path / "d.png")  # 2 x 2 white tiles
    assert canvas.shape == (3 + 2 + 3, 3 + 2 + 3, 3)
    assert plots.GRID_PADDING == 2 and 0 < plots.GRID_PAD_VALUE < 255
    assert (canvas[3:5] == plots.GRID_PAD_VALUE).all() and (canvas[:, 3:5] == plots.GRID_PAD_VALUE).all()


def test_image_grid_keeps_rgb_channels(tmp_path: Path) -> None:
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    for k in range(4):
        for c in range(3):
            images[k, c] = 40 * k + 10 * c + 1
    canvas = plots.image_grid(images, tmp_path / "rgb.png")
    picture = _read_rgb(tmp_path / "rgb.png")
    assert canvas.shape == picture.shape == (6, 6, 3)
    for k in range(4):
        top, left = (k // 2) * 4, (k % 2) * 4
        for tile in (canvas.numpy(), picture):
            assert (tile[top : top + 2, left : left + 2] == [40 * k + 1, 40 * k + 11, 40 * k + 21]).all()
    assert (picture[2:4] == plots.GRID_PAD_VALUE).all() and (picture[:, 2:4] == plots.GRID_PAD_VALUE).all()


def test_image_grid_float_and_integer_levels_give_one_picture(tmp_path: Path) -> None:
    levels = torch.randint(0, 17, (6, 3, 5, 5))
    levels[0, 0, 0, 0], levels[0, 0, 0, 1], levels[0, 0, 0, 2] = 0, 8, 16
    from_levels = plots.image_grid(levels, tmp_path / "int.png", levels=17)
    from_floats = plots.image_grid(levels.double() / 16, tmp_path / "float.png")
    assert torch.equal(from_levels, from_floats)
    assert np.array_equal(_read_rgb(tmp_path / "int.png"), _read_rgb(tmp_path / "float.png"))
    assert from_levels[0, :3, 0].tolist() == [0, 128, 255]
    allowed = {round(255 * k / 16) for k in range(17)}
    assert set(from_levels.unique().tolist()) <= allowed

    clamped = plots.image_grid(torch.tensor([-0.5, 0.5, 1.5]).view(1, 1, 1, 3), tmp_path / "c.png")
    assert clamped[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    "images",
    [
        torch.rand(2, 2, 4, 4),
        torch.rand(2, 4, 4, 4),
        torch.rand(3, 4, 4),
        torch.rand(0, 1, 4, 4),
        torch.rand(2, 1, 0, 4),
        torch.full((1, 1, 2, 2), float("nan")),
        torch.full((1, 1, 2, 2), 17),
        torch.full((1, 1, 2, 2), -1),
    ],
)
def test_image_grid_rejects_bad_images(tmp_path: Path, images: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        plots.image_grid(images, tmp_path / "bad.png", levels=17)
    assert not (tmp_path / "bad.png").exists()


def test_side_by_side_puts_left_and_right_in_two_columns(tmp_path: Path) -> None:
    left = (20 * torch.arange(3)).view(3, 1, 1, 1).expand(3, 1, 2, 3)
    right = 100 + left
    canvas = plots.side_by_side(left, right, tmp_path / "pair.png")
    picture = _read_rgb(tmp_path / "pair.png")
    assert canvas.shape == picture.shape == (3 * 2 + 2, 2 * 3 + 5, 3)
    assert np.array_equal(canvas.numpy(), picture)
    for k in range(3):
        assert (picture[3 * k : 3 * k + 2, 0:3] == 20 * k).all()
        assert (picture[3 * k : 3 * k + 2, 8:11] == 100 + 20 * k).all()
    assert (picture[:, 3:8] == 255).all() and (picture[[2, 5]] == 255).all()
    with pytest.raises(ValueError, match="same shape"):
        plots.side_by_side(left, right[:2], tmp_path / "bad.png")


def test_side_by_side_grids(tmp_path: Path) -> None:
    left = (20 * torch.arange(3)).view(3, 1, 1, 1).expand(3, 1, 2, 3)
    canvas = plots.side_by_side(left, 100 + left, tmp_path / "grids.png", nrow=2).numpy()
    assert canvas.shape == (2 * 2 + 1, 2 * (2 * 3 + 1) + 5, 3)  # two 2 x 2 grids, the last slot of each empty
    for k, (top, first) in enumerate([(0, 0), (0, 4), (3, 0)]):
        assert (canvas[top : top + 2, first : first + 3] == 20 * k).all()
        assert (canvas[top : top + 2, 12 + first : 12 + first + 3] == 100 + 20 * k).all()
    assert (canvas[3:5, 4:7] == 255).all() and (canvas[3:5, 16:19] == 255).all()  # the empty slots
    with pytest.raises(ValueError, match="nrow must be positive"):
        plots.side_by_side(left, left, tmp_path / "bad.png", nrow=0)


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_read_metrics_and_training_curves(tmp_path: Path) -> None:
    lines = [{"step": s, "split": "train", "nll": 3.0 - s / 100, "lr": 1e-3, "time": 0.1} for s in range(40, 0, -1)]
    lines += ["", "   "]
    lines += [{"step": s, "split": "test", "nll": 2.9 - s / 100, "accuracy": 0.5 + s / 100} for s in (30, 10, 20)]
    lines += [{"step": 41, "split": "train", "nll": None}]
    metrics_path = _write_jsonl(tmp_path / "metrics.jsonl", lines)

    metrics = plots.read_metrics(metrics_path)
    assert list(metrics) == ["nll", "accuracy", "lr"]
    assert set(metrics["nll"]) == {"train", "test"}
    assert metrics["nll"]["train"] == (list(range(1, 41)), [3.0 - s / 100 for s in range(1, 41)])  # sorted by step
    assert metrics["nll"]["test"] == ([10, 20, 30], [2.9 - s / 100 for s in (10, 20, 30)])
    assert set(metrics["lr"]) == {"train"} and set(metrics["accuracy"]) == {"test"}

    assert plots.training_curves(metrics_path, tmp_path / "out" / "curves.png") is None
    picture = _read_rgb(tmp_path / "out" / "curves.png")
    assert picture.shape == (320, 3 * 400, 3) and len(np.unique(picture.reshape(-1, 3), axis=0)) > 20

    with_bits = _write_jsonl(tmp_path / "bits.jsonl", [{"step": 1, "split": "train", "nll": 2.0, "bits_per_dim": 3.5}])
    plots.training_curves(with_bits, tmp_path / "bits.png")
    assert _read_rgb(tmp_path / "bits.png").shape == (320, 400, 3)  # one panel: bits per dim replaces nll


def test_training_curves_smooths_long_runs_and_survives_nan(tmp_path: Path) -> None:
    lines = [
        {"step": s, "split": "train", "nll": float("nan") if s == 50 else 2.0, "lr": 0.1 / (1 + s)} for s in range(200)
    ]
    lines.append({"step": 200, "split": "test", "nll": float("inf")})
    plots.training_curves(_write_jsonl(tmp_path / "m.jsonl", lines), tmp_path / "c.png")
    assert _read_rgb(tmp_path / "c.png").shape == (320, 800, 3)
    smooth = plots._running_mean(np.array([1.0, 2.0, float("nan"), 4.0, 5.0]), 3)
    assert np.allclose(smooth, [1.5, 1.5, 3.0, 4.5, 4.5])


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"split": "train", "nll": 1.0}),
        json.dumps({"step": 1.5, "split": "train"}),
        json.dumps({"step": 1, "nll": 1.0}),
        json.dumps({"step": 1, "split": "train", "nll": "low"}),
    ],
)
def test_training_curves_names_the_malformed_line(tmp_path: Path, bad: str) -> None:
    good = json.dumps({"step": 0, "split": "train", "nll": 1.0})
    metrics_path = _write_jsonl(tmp_path / "metrics.jsonl", [good, "", bad, good])
    with pytest.raises(ValueError, match="line 3"):
        plots.training_curves(metrics_path, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_training_curves_needs_a_metric(tmp_path: Path) -> None:
    metrics_path = _write_jsonl(tmp_path / "metrics.jsonl", ["", {"step": 0, "split": "train", "loss": 1.0}])
    with pytest.raises(ValueError, match="no line holds"):
        plots.training_curves(metrics_path, tmp_path / "c.png")


def test_repeated_calls_leave_no_figure_alive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every figure the 150 calls create is freed (tracked one by one, whatever other tests left)."""
    import weakref

    from matplotlib import pyplot
    from matplotlib.figure import Figure

    created: list[weakref.ref] = []
    original_init = Figure.__init__

    def tracking_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        created.append(weakref.ref(self))

    monkeypatch.setattr(Figure, "__init__", tracking_init)
    data = torch.randn(50, 2)
    metrics_path = _write_jsonl(tmp_path / "m.jsonl", [{"step": 0, "split": "train", "nll": 1.0}])
    images = torch.rand(4, 1, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(30):
            plots.density_map(_gaussian_log_prob((0.0, 0.0)), data, tmp_path / "d.png", resolution=8)
            plots.scatter_samples(data, data, tmp_path / "s.png")
            plots.training_curves(metrics_path, tmp_path / "t.png")
            plots.image_grid(images, tmp_path / "g.png")
            plots.side_by_side(images, images, tmp_path / "p.png")
    gc.collect()
    assert pyplot.get_fignums() == []
    assert len(created) >= 90  # density maps, scatters and curves draw figures
    assert all(ref() is None for ref in created)


def test_importing_iresnet_does_not_import_matplotlib() -> None:
    code = "import sys, iresnet, iresnet.report.plots; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
