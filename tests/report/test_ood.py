"""Out-of-distribution likelihoods: the AUROC against a pairwise count, the OOD inputs, the
comparison under a trained model, its histograms and ``iresnet eval RUN --ood DATA``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from iresnet.cli import main
from iresnet.report import plots
from iresnet.report.ood import auroc, compare_likelihoods, ood_inputs
from iresnet.train import load_run

DIGITS_TINY = ["--steps", "2", "--no-progress", "model.blocks=1", "model.hidden=8", "model.fc_blocks=0"]
DIGITS_TINY += ["eval_size=64", "--batch-size", "32"]


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


def pairwise_auroc(in_scores: list[float], out_scores: list[float]) -> float:
    """The Mann-Whitney statistic by brute force: wins plus half the ties over all pairs."""
    wins = sum((a > b) + 0.5 * (a == b) for a in in_scores for b in out_scores)
    return wins / (len(in_scores) * len(out_scores))


scores = st.lists(st.integers(-4, 4), min_size=1, max_size=40)  # few values: many ties


@settings(max_examples=200, deadline=None)
@given(in_scores=scores, out_scores=scores)
def test_auroc_is_the_pairwise_count_with_half_ties(in_scores: list[int], out_scores: list[int]) -> None:
    expected = pairwise_auroc(in_scores, out_scores)
    assert auroc(torch.tensor(in_scores, dtype=torch.float64), torch.tensor(out_scores)) == pytest.approx(expected)
    assert auroc(torch.tensor(out_scores), torch.tensor(in_scores)) == pytest.approx(1 - expected)


def test_auroc_extremes_and_chance() -> None:
    low, high = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 4.0])
    assert auroc(high, low) == 1.0
    assert auroc(low, high) == 0.0  # reported as it is, never flipped
    assert auroc(torch.full((5,), 2.0), torch.full((7,), 2.0)) == 0.5
    assert auroc(torch.tensor([1.0, 4.0]), torch.tensor([2.0, 3.0])) == 0.5


@pytest.mark.parametrize("empty", ["in", "out"])
def test_auroc_refuses_empty_sets_and_nan(empty: str) -> None:
    scores = {"in": torch.ones(3), "out": torch.ones(3), empty: torch.empty(0)}
    with pytest.raises(ValueError, match="both sets"):
        auroc(scores["in"], scores["out"])
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([1.0, float("nan")]), torch.ones(2))


def test_noise_is_uniform_levels_of_the_test_shape() -> None:
    test = torch.randint(0, 17, (300, 1, 8, 8), dtype=torch.uint8)
    noise = ood_inputs("noise", test, 17, torch.Generator().manual_seed(1))
    assert noise.shape == test.shape and noise.dtype == torch.uint8
    assert noise.min() == 0 and noise.max() == 16
    assert torch.equal(noise, ood_inputs("noise", test, 17, torch.Generator().manual_seed(1)))


def test_inverted_flips_the_levels() -> None:
    test = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    inverted = ood_inputs("inverted", test, 256, torch.Generator())
    assert inverted.shape == test.shape and inverted.dtype == torch.uint8
    assert torch.equal(inverted.long(), 255 - test.long())


def test_an_image_data_set_of_the_same_shape() -> None:
    pytest.importorskip("sklearn")
    from iresnet.data import load_images

    test = torch.zeros(10, 1, 8, 8, dtype=torch.uint8)
    assert torch.equal(ood_inputs("digits", test, 17, torch.Generator()), load_images("digits", train=False)[0][:10])


def test_unknown_names_and_other_shapes_are_refused_before_reading_files(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_files(*args, **kwargs):
        raise AssertionError("no file should be read")

    monkeypatch.setattr("iresnet.report.ood.load_images", no_files)
    digits = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="choose one of noise, inverted, digits, mnist, mnist3x32, cifar10"):
        ood_inputs("svhn", digits, 17, torch.Generator())
    with pytest.raises(
        ValueError, match=r"mnist images have shape \(1, 28, 28\) and 256 levels, .* \(1, 8, 8\) and 17"
    ):
        ood_inputs("mnist", digits, 17, torch.Generator())
    with pytest.raises(ValueError, match="digits images have shape .* and 17 levels, .* and 256 levels"):
        ood_inputs("digits", digits, 256, torch.Generator())


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("ood") / "digits"
    assert run_cli("train", "--preset", "digits", "--out", str(out), *DIGITS_TINY) == 0
    return out


def test_compare_likelihoods_is_seeded_and_consistent(digits_run: Path) -> None:
    model, _ = load_run(digits_run)
    images = torch.randint(0, 17, (40, 1, 8, 8), dtype=torch.uint8)
    inverted = 16 - images
    state = torch.get_rng_state()
    first = compare_likelihoods(model, images, inverted, batch_size=16)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    torch.rand(3)  # moves the global generator on: the comparison seeds its own draws
    second = compare_likelihoods(model, images, inverted, batch_size=16)
    for name in ("in_bits_per_dim", "out_bits_per_dim"):  # equal up to the power iteration's last steps
        assert torch.allclose(getattr(first, name), getattr(second, name), rtol=1e-5, atol=0)
    assert first.in_bits_per_dim.shape == first.out_bits_per_dim.shape == (40,)
    assert first.in_distribution.n == first.out_of_distribution.n == 40
    assert first.in_distribution.bits_per_dim == pytest.approx(first.in_bits_per_dim.mean().item())
    assert first.out_of_distribution.bits_per_dim == pytest.approx(first.out_bits_per_dim.mean().item())
    assert first.auroc == auroc(-first.in_bits_per_dim, -first.out_bits_per_dim)  # higher likelihood: inside


def test_likelihood_histograms(tmp_path: Path) -> None:
    in_bpd, out_bpd = torch.randn(100) + 3, torch.randn(60) + 5
    figure = plots.likelihood_histograms(in_bpd, out_bpd, ("digits", "noise"), 0.987654, path=tmp_path / "h.png")
    axes = figure.axes[0]
    assert "AUROC 0.9877" in axes.get_title() and axes.get_xlabel() == "bits/dim"
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["digits (100)", "noise (60)"]
    heights = [[bar.get_height() for bar in bars] for bars in axes.containers]
    assert [len(h) for h in heights] == [plots.HISTOGRAM_BINS] * 2 and all(sum(h) == pytest.approx(1) for h in heights)
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="out_bpd must be a non-empty 1-D tensor of finite values"):
        plots.likelihood_histograms(in_bpd, torch.tensor([1.0, float("inf")]), ("a", "b"), 0.5)


def test_eval_ood_noise_json(digits_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("eval", str(digits_run), "--json") == 0
    plain = json.loads(capsys.readouterr().out)
    assert run_cli("eval", str(digits_run), "--ood", "noise", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    ood = report["ood"]
    assert set(ood) == {"data", "in", "out", "auroc", "picture"} and ood["data"] == "noise"
    assert ood["in"]["n"] == ood["out"]["n"] == report["n"] == 297  # the whole test set
    assert ood["in"]["bits_per_dim"] == pytest.approx(plain["bits_per_dim"], rel=1e-9)  # the evaluation without --ood
    assert ood["in"]["bits_per_dim_se"] > 0 and ood["out"]["bits_per_dim_se"] > 0
    assert ood["out"]["bits_per_dim"] > ood["in"]["bits_per_dim"]
    assert 0.9 < ood["auroc"] <= 1  # two steps of training already give noise a far lower likelihood
    assert ood["picture"] == f"{digits_run}/ood-noise.png"
    with Image.open(ood["picture"]) as image:
        image.verify()
        assert image.format == "PNG"
    assert json.loads((digits_run / "eval.json").read_text()) == report


def test_eval_ood_text_table(digits_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("eval", str(digits_run), "--ood", "inverted") == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("data set"))) :]
    assert table[1].split()[:3] == ["digits", "test", "297"] and table[2].split()[:2] == ["inverted", "297"]
    assert run_cli("eval", str(digits_run), "--ood", "inverted", "--json") == 0
    auroc = json.loads(capsys.readouterr().out)["ood"]["auroc"]
    assert table[3].startswith(f"AUROC {auroc:.4f} ")  # the text shows the value the JSON reports
    assert table[3].endswith("(in-distribution = higher likelihood)")
    assert (digits_run / "ood-inverted.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_ood_unknown_data_is_a_message(digits_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("eval", str(digits_run), "--ood", "mnist") == 2
    error = capsys.readouterr().err
    assert "mnist images have shape (1, 28, 28)" in error and "Traceback" not in error
    assert run_cli("eval", str(digits_run), "--ood", "digits") == 2
    assert "is the run's own data set" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("train", "held"),
    [
        (["--steps", "1", "model.blocks=1", "model.hidden=8", "eval_size=64"], "density run on 8gaussians"),
        (
            ["--preset", "digits-classifier", "--steps", "1", "model.blocks=[1,1]", "model.hidden=[8,8]"]
            + ["eval_size=64", "--batch-size", "32"],
            "classify run on digits",
        ),
    ],
    ids=["toy", "classifier"],
)
def test_ood_needs_a_density_model_of_images(
    train: list[str], held: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if "digits-classifier" in train:
        pytest.importorskip("sklearn")
    out = tmp_path / "run"
    assert run_cli("train", "--out", str(out), "--no-progress", *train) == 0
    capsys.readouterr()
    assert run_cli("eval", str(out), "--ood", "noise") == 2
    error = capsys.readouterr().err
    assert error == f"iresnet eval: error: --ood needs a density model of images; {out} holds a {held}\n"
    assert not (out / "eval.json").exists()
