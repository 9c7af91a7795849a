"""The FID: the Fréchet distance against closed forms, the whole path of ``fid_run`` with a small
random feature network in place of Inception, and the messages without weights or the extra."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from iresnet.cli import main
from iresnet.report import fid


def test_identical_statistics_are_at_distance_zero() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 20))
    sigma = a.T @ a / 50 + 1e-3 * np.eye(20)
    mu = rng.normal(size=20)
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9 * np.trace(sigma))
    singular = a[:5].T @ a[:5]  # rank 5 of 20: fewer samples than features
    assert fid.frechet_distance(mu, singular, mu, singular) == pytest.approx(0, abs=1e-9 * np.trace(singular))


def test_diagonal_covariances_give_the_closed_form() -> None:
    """Commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 5, 30), rng.uniform(0, 5, 30)
    mu1, mu2 = rng.normal(size=30), rng.normal(size=30)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    rotation, _ = np.linalg.qr(rng.normal(size=(30, 30)))  # commuting, not diagonal: the same distance
    rotated = fid.frechet_distance(mu1, rotation @ np.diag(a) @ rotation.T, mu2, rotation @ np.diag(b) @ rotation.T)
    assert rotated == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(np.zeros(1), np.ones((1, 1)), np.full(1, 3.0), np.full((1, 1), 4.0)) == 10.0


def test_frechet_distance_is_symmetric_and_checks_its_input() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    s1, s2 = fid.feature_statistics(x), fid.feature_statistics(torch.from_numpy(y))
    assert np.allclose(s1.sigma, np.cov(x, rowvar=False)) and s1.n == 40
    forward = fid.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert forward == pytest.approx(fid.frechet_distance(s2.mu, s2.sigma, s1.mu, s1.sigma), rel=1e-8) and forward > 0
    with pytest.raises(ValueError, match="one F"):
        fid.frechet_distance(s1.mu, s1.sigma, s2.mu[:5], s2.sigma)
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(s1.mu * np.nan, s1.sigma, s2.mu, s2.sigma)
    with pytest.raises(ValueError, match="n >= 2"):
        fid.feature_statistics(x[:1])


def test_images_become_rgb_bytes() -> None:
    images = torch.tensor([[[[0.0, 16.4, 8.0, -3.0, 40.0]]]])  # digits: 17 levels
    rgb = fid.to_rgb_uint8(images, 17)
    assert rgb.dtype == torch.uint8 and rgb.shape == (1, 3, 1, 5)
    assert rgb[0, :, 0].T.tolist() == [[0] * 3, [255] * 3, [128] * 3, [0] * 3, [255] * 3]
    with pytest.raises(ValueError, match="NaN"):
        fid.to_rgb_uint8(torch.full((1, 1, 2, 2), math.nan), 17)


def _random_features() -> nn.Module:
    """A fixed random convolutional network: uint8 RGB (N, 3, H, W) -> 8 features."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 8))

    class Features(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            assert images.dtype == torch.uint8 and images.shape[1] == 3
            return network(images.float() / 255)

    return Features()


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return int(exit_info.value.code or 0)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("fid") / "digits"
    small = ["model.blocks=1", "model.hidden=8", "model.fc_blocks=0", "eval_size=64", "--batch-size", "32"]
    assert run_cli("train", "--preset", "digits", "--out", str(out), "--steps", "2", "--no-progress", *small) == 0
    return out


def test_fid_of_a_run_with_a_small_feature_network(digits_run: Path, tmp_path: Path) -> None:
    features = _random_features()
    result = fid.fid_run(digits_run, features=features, n=64, batch_size=25, device="cpu")
    assert math.isfinite(result.fid) and result.fid > 0 and result.dims == 8 and result.n == 64
    assert "64 training images" in str(result) and str(result).startswith("FID ")
    again = fid.fid_run(digits_run, features=features, n=64, batch_size=64, device="cpu")
    assert again.fid == pytest.approx(result.fid, rel=1e-6)  # batches do not change the draws

    from iresnet.train.checkpoint import load_config
    from iresnet.train.sources import run_source

    data = run_source(load_config(digits_run)).image_data()
    train = fid.image_statistics(data.train[:64], data.levels, features)
    path = tmp_path / "train.npz"
    np.savez(path, mu=train.mu, sigma=train.sigma)
    stored = fid.fid_run(digits_run, features=features, n=64, reference_stats=path, device="cpu")
    assert stored.fid == pytest.approx(result.fid, rel=1e-9) and "the statistics in" in stored.reference
    loaded = fid.load_statistics(path)
    assert np.array_equal(loaded.mu, train.mu) and np.array_equal(loaded.sigma, train.sigma)
    assert fid.frechet_distance(train.mu, train.sigma, loaded.mu, loaded.sigma) == pytest.approx(0, abs=1e-9)

    np.savez(tmp_path / "bad.npz", mu=train.mu)
    with pytest.raises(ValueError, match="missing: sigma"):
        fid.fid_run(digits_run, features=features, n=64, reference_stats=tmp_path / "bad.npz", device="cpu")
    np.savez(tmp_path / "small.npz", mu=train.mu[:3], sigma=train.sigma[:3, :3])
    with pytest.raises(ValueError, match="3 features, the samples' 8"):
        fid.fid_run(digits_run, features=features, n=64, reference_stats=tmp_path / "small.npz", device="cpu")


def test_missing_weights_is_a_message(digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "inception.pth"
    with pytest.raises(FileNotFoundError, match="no Inception weights file at .*pass its path to --weights"):
        fid.inception_features(missing)
    assert run_cli("fid", str(digits_run), "--weights", str(missing), "--n", "8") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"iresnet fid: error: no Inception weights file at {missing}")
    assert fid.WEIGHTS_URL in err[0]


def test_missing_extra_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # an import of it raises ImportError
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match=r"pip install 'iresnet\[fid\]'"):
        fid.inception_features(weights)


def test_weights_that_are_not_inception_are_a_message(tmp_path: Path) -> None:
    pytest.importorskip("torch_fidelity")
    weights = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match="does not hold torch-fidelity's Inception-v3 weights"):
        fid.inception_features(weights)


def test_fid_json_and_refusals(digits_run: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    features = _random_features()
    monkeypatch.setattr(fid, "inception_features", lambda weights, device: features)
    assert run_cli("fid", str(digits_run), "--weights", "W", "--n", "16", "--temperature", "0.5", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 16 and report["temperature"] == 0.5 and report["dims"] == 8 and report["fid"] > 0
    assert run_cli("fid", str(digits_run)) == 2
    assert "the following arguments are required: --weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 2"):
        fid.fid_run(digits_run, features=features, n=1)
