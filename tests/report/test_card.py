"""The report card of ``iresnet eval`` on tiny density runs: the figure over evaluation seeds with
its estimator named, the parameter count, the time per step, the inverse's errors and
iterations, and each block's certified bound against its design bound."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from iresnet.cli import main
from iresnet.models import toy_flow
from iresnet.report.card import (
    BlockCertificate,
    block_certificates,
    estimator_words,
    reconstruction_errors,
    step_seconds,
)
from iresnet.report.evaluation import RunReport, evaluate_run
from iresnet.train.checkpoint import load_run

SMALL = ["model.blocks=1", "model.hidden=8", "eval_size=64", "--batch-size", "32", "--steps", "3", "--no-progress"]


def train(out: Path, *args: str) -> Path:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(out), *SMALL, *args])
    assert exit_info.value.code == 0
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("card") / "toy")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunReport]:
    pytest.importorskip("sklearn")
    run = train(tmp_path_factory.mktemp("card") / "digits", "--preset", "digits")
    return run, evaluate_run(run, progress=False)


def check_common(run: Path, card: dict) -> None:
    model, _ = load_run(run)
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["step_seconds"] > 0  # the engine's train records give their speed
    assert card["peak_memory_bytes"] >= 0 and card["peak_memory_kind"].startswith("CPU")
    reconstruction = card["reconstruction"]
    assert reconstruction["n"] == 64 and 0 < reconstruction["max_abs_error"] < 1e-3
    assert reconstruction["mean_abs_error"] <= reconstruction["max_abs_error"]
    assert 1 <= reconstruction["iterations_mean"] <= reconstruction["iterations_max"]
    assert len(card["blocks"]) >= 1
    for block in card["blocks"]:
        assert 0 < block["certified"] <= block["design"] < 1 and not block["exceeds"]
        assert block["iterations"] >= 1


def test_toy_card(toy: Path) -> None:
    result = evaluate_run(toy, progress=False)
    card = result.report["card"]
    assert card["unit"] == "nats" and card["seeds"] == [7, 8, 9] and len(card["per_seed"]) == 3
    assert card["per_seed"][0] == result.report["nll"]  # the first seed is the usual evaluation
    assert card["std"] == 0  # the exact log-det of 2-D data: nothing random to reseed
    assert card["se"] == result.report["nll_se"] > 0
    assert card["train_logdet"] == card["eval_logdet"] == {"name": "exact"}
    assert card["coeff"] == 0.97  # the toy preset's
    assert [b["kind"] for b in card["blocks"]] == ["residual"]
    check_common(toy, card)
    assert "nats (std over seeds; exact)" in result.text and "test NLL" in result.text


def test_digits_card(digits: tuple[Path, RunReport]) -> None:
    run, result = digits
    card = result.report["card"]
    assert card["unit"] == "bits/dim" and len(card["per_seed"]) == 3
    assert card["per_seed"][0] == result.report["bits_per_dim"]
    assert len(set(card["per_seed"])) == 3 and card["std"] > 0  # the noise and the roulette draws differ
    assert card["std"] == pytest.approx(statistics.stdev(card["per_seed"]))
    assert card["eval_logdet"]["name"] == "roulette"
    assert (card["eval_logdet"]["n_exact_terms"], card["eval_logdet"]["n_probes"]) == (20, 4)
    assert card["train_logdet"]["name"] == "roulette" and card["train_logdet"]["n_probes"] == 1
    check_common(run, card)
    bits_lines = [line for line in result.text.splitlines() if "bits/dim" in line and "baseline" not in line]
    assert len(bits_lines) == 2
    assert all("roulette, 20 exact terms, geometric(0.5) tail, 4 probes" in line for line in bits_lines)


def test_cli_seeds_and_json(toy: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(toy), "--json", "--seeds", "2"])
    assert exit_info.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["card"]["seeds"] == [7, 8] and math.isfinite(report["nll"])
    assert json.loads((toy / "eval.json").read_text())["card"] == report["card"]


def test_time_per_step_not_recorded(toy: Path, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    records = [json.loads(line) for line in (toy / "metrics.jsonl").read_text().splitlines()]
    assert step_seconds(toy / "metrics.jsonl") == pytest.approx(
        sum(1 / r["steps_per_s"] for r in records if r["split"] == "train")
        / sum(r["split"] == "train" for r in records)
    )
    metrics.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "steps_per_s"}) for r in records))
    assert step_seconds(metrics) is None and step_seconds(tmp_path / "absent.jsonl") is None


def test_implicit_blocks_certify_both_branches() -> None:
    model = toy_flow(2, blocks=2, hidden=8, block="implicit")
    error, _ = reconstruction_errors(model, torch.randn(16, 2))
    rows = block_certificates(model)
    assert [(r.index, r.kind) for r in rows] == [
        (0, "implicit g_x"),
        (0, "implicit g_z"),
        (1, "implicit g_x"),
        (1, "implicit g_z"),
    ]
    assert error < 1e-3 and all(r.design is not None and r.certified <= r.design for r in rows)
    assert all(r.iterations is None for r in rows if r.kind == "implicit g_z")  # the inverse solves g_x's


def test_flags_and_words() -> None:
    assert BlockCertificate(0, "residual", 0.95, 0.9, None).exceeds
    assert not BlockCertificate(0, "residual", 0.85, 0.9, None).exceeds
    assert not BlockCertificate(0, "residual", 0.85, None, None).exceeds
    assert (
        estimator_words({"name": "series", "n_terms": 5, "n_probes": 1})
        == "series, 5 terms (truncated: biased), 1 probe"
    )
    poisson = {"name": "roulette", "n_exact_terms": 20, "distribution": "poisson", "p": 0.5, "rate": 2.0, "n_probes": 1}
    assert estimator_words(poisson) == "roulette, 20 exact terms, Poisson(2) tail, 1 probe"
