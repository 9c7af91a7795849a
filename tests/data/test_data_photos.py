"""The data sets bundled in scikit-image and scikit-learn: photo patches split by photograph, and
the LFW faces; each trains two steps through the command line, with its baselines."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from iresnet.cli import main
from iresnet.data import IMAGE_DATASETS, PHOTOGRAPHS, TEST_PHOTOGRAPHS, load_images, patch_sources
from iresnet.train.presets import PRESETS

# Patches per photograph on the non-overlapping grid: floor(H / s) * floor(W / s).
SIZES = {  # (H, W) of each photograph
    "astronaut": (512, 512),
    "chelsea": (300, 451),
    "coffee": (400, 600),
    "rocket": (427, 640),
    "motorcycle_left": (500, 741),
    "motorcycle_right": (500, 741),
    "china": (427, 640),
    "flower": (427, 640),
}
COUNTS = {"patches16": (6460, 1965), "patches32": (1592, 476)}


@pytest.mark.parametrize("name", ["patches16", "patches32"])
def test_patches_shapes_dtypes_ranges_and_counts(name: str) -> None:
    size = IMAGE_DATASETS[name].shape[-1]
    for train, n in zip([True, False], COUNTS[name]):
        images, labels = load_images(name, train=train)
        assert images.shape == (n, 3, size, size) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64 and not labels.any()
        assert images.min() == 0 and images.max() == 255
        sources = patch_sources(name, train=train)
        assert len(sources) == n
        expected = {
            photo: (h // size) * (w // size) for photo, (h, w) in SIZES.items() if (photo in TEST_PHOTOGRAPHS) != train
        }
        assert Counter(sources) == expected


@pytest.mark.parametrize("name", ["patches16", "patches32"])
def test_patches_are_split_by_photograph(name: str) -> None:
    train, test = set(patch_sources(name, train=True)), set(patch_sources(name, train=False))
    assert test == {"coffee", "flower"} == set(TEST_PHOTOGRAPHS)
    assert train == set(PHOTOGRAPHS) - test and not train & test
    # No test patch equals a training patch either.
    train_bytes = {bytes(p) for p in load_images(name, train=True)[0].flatten(1).numpy()}
    assert not any(bytes(p) in train_bytes for p in load_images(name, train=False)[0].flatten(1).numpy())


def test_patches_are_the_photographs_grid_cells_in_order() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    images = load_images("patches32", train=True)[0]
    sources = patch_sources("patches32", train=True)
    astronaut = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1)  # (3, 512, 512)
    first = sources.index("astronaut")
    assert torch.equal(images[first], astronaut[:, :32, :32])
    assert torch.equal(images[first + 1], astronaut[:, :32, 32:64])  # row by row
    assert torch.equal(images[first + 16], astronaut[:, 32:64, :32])  # 512 / 32 = 16 cells a row
    chelsea = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)  # (3, 300, 451): 9 x 14 cells
    last = len(sources) - 1 - sources[::-1].index("chelsea")
    assert torch.equal(images[last], chelsea[:, 256:288, 416:448])


@pytest.mark.parametrize("name", ["patches16", "patches32", "faces"])
def test_loads_are_deterministic(name: str) -> None:
    for train in (True, False):
        first, again = load_images(name, train=train), load_images(name, train=train)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_faces_crop_split_and_labels() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    train, train_labels = load_images("faces", train=True)
    test, test_labels = load_images("faces", train=False)
    assert train.shape == (150, 1, 24, 24) and test.shape == (50, 1, 24, 24)
    assert train.dtype == test.dtype == torch.uint8 and train_labels.dtype == torch.int64
    assert train.max() == 255 and train.min() == 0
    assert train_labels.bincount().tolist() == [75, 75] and test_labels.bincount().tolist() == [25, 25]
    # The documented rule: the seeded permutation's last 50 indices, sorted; the top-left 24 x 24
    # of round(255 x); faces (label 1) are lfw_subset's first 100 images.
    pixels = skimage_data.lfw_subset()
    chosen = np.sort(np.random.RandomState(0).permutation(200)[150:])
    expected = np.round(pixels[chosen, :24, :24] * 255).astype(np.uint8)
    np.testing.assert_array_equal(test.squeeze(1).numpy(), expected)
    np.testing.assert_array_equal(test_labels.numpy(), (chosen < 100).astype(np.int64))
    train_chosen = np.sort(np.random.RandomState(0).permutation(200)[:150])
    assert not set(train_chosen) & set(chosen) and len(set(train_chosen) | set(chosen)) == 200


@pytest.mark.parametrize("name", ["patches16", "faces"])
def test_a_missing_scikit_image_is_named(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage raises ImportError
    with pytest.raises(ImportError, match="scikit-image: pip install scikit-image"):
        load_images(name)


def test_patch_sources_refuses_other_data_sets() -> None:
    with pytest.raises(ValueError, match="not a patch data set"):
        patch_sources("faces")


def test_presets_use_their_data_sets() -> None:
    for name in ("patches16", "patches32", "faces"):
        assert PRESETS[name]["data"] == name and PRESETS[name]["model"]["scales"] == 3


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


@pytest.mark.parametrize("name", ["patches16", "patches32", "faces"])
def test_each_trains_and_reports_bits_per_dim_beside_baselines(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / name
    small = ["model.blocks=1", "model.hidden=8", "model.fc_blocks=0", "eval_size=64", "--batch-size", "32"]
    assert run_cli("train", "--preset", name, "--out", str(out), "--steps", "2", "--no-progress", *small) == 0
    printed = capsys.readouterr().out
    assert "bits/dim" in printed
    assert "baseline, independent pixels" in printed and "baseline, full-covariance Gaussian" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == name and config["steps"] == 2
