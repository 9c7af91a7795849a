"""The ``iresnet`` command: train, eval (text and --json), sample, help, clean errors, and a
Ctrl-C that writes a checkpoint from which --resume continues."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image

from helpers import stop_after
from iresnet.cli import main

TINY = ["--steps", "4", "--batch-size", "64", "--no-progress", "model.blocks=2", "model.hidden=16", "eval_size=500"]


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert run_cli("train", "--out", str(out), *TINY) == 0
    return out


def test_eval_json_prints_one_object(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("eval", str(trained), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 500 and report["nll_se"] > 0 and report["bits_per_dim"] is None
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    last_test = [r for r in metrics if r["split"] == "test"][-1]
    assert report["nll"] == pytest.approx(last_test["nll"], abs=1e-6)  # same weights, same test set
    assert json.loads((trained / "eval.json").read_text()) == report


def test_eval_text(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("eval", str(trained)) == 0
    printed = capsys.readouterr().out
    assert "test NLL" in printed
    assert "report card over 3 evaluation seeds" in printed and "nats (std over seeds; exact)" in printed
    assert re.search(r"parameters +[\d,]+\n", printed) and "certified Lip(g)" in printed


def test_eval_seeds_must_be_positive(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("eval", str(trained), "--seeds", "0") == 2
    assert "--seeds" in capsys.readouterr().err


def test_sample_writes_png(trained: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.png"
    assert run_cli("sample", str(trained), "--n", "16", "--out", str(path)) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_temperature_is_printed_and_stored_beside_the_picture(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "cool.png"
    assert run_cli("sample", str(trained), "--n", "16", "--out", str(path), "--temperature", "0.7", "--seed", "3") == 0
    assert f"16 samples at temperature 0.7 written to {path}" in capsys.readouterr().out
    about = json.loads((tmp_path / "cool.png.json").read_text())
    assert about == {"temperature": 0.7, "n": 16, "seed": 3, "by_class": False, "run": str(trained)}


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "warm"])
def test_sample_temperature_must_be_positive(value: str, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("sample", "RUN", "--temperature", value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"iresnet sample: error: argument --temperature: must be a number > 0, got {value!r}"


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["sample"], ["demo"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture) -> None:
    assert run_cli(*command, "--help") == 0
    assert "usage: iresnet" in capsys.readouterr().out


def test_errors_are_messages_not_tracebacks(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("train", "--out", str(trained), *TINY) == 2
    assert "--resume" in capsys.readouterr().err
    assert run_cli("train", "--out", str(tmp_path / "x"), "lrate=3") == 2
    assert "unknown setting 'lrate'" in capsys.readouterr().err
    assert run_cli("eval", str(tmp_path)) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "iresnet", "train", "--out", str(out), "--steps", "100000", "--no-progress"]
    command += ["model.blocks=2", "model.hidden=16", "eval_size=500", "log_every=1", "checkpoint_every=100000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 5):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "--resume" in stdout
    import torch

    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 5
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert max(r["step"] for r in records) == step
    env = {**os.environ}
    finish = [sys.executable, "-m", "iresnet", "train", "--out", str(out), "--resume", "--steps", str(step + 3)]
    finish += ["--no-progress", "model.blocks=2", "model.hidden=16", "eval_size=500", "log_every=1"]
    finish += ["checkpoint_every=100000"]
    done = subprocess.run(finish, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert [s for s in steps if s > step] == [step + 1, step + 2, step + 3, step + 3]  # 3 train, 1 test


def test_the_printed_hint_resumes_a_run_as_it_was_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``--resume`` reads the run's config.json: the bare hint continues a digits run with its own
    steps, lr and model; a flag given with it changes that setting alone."""
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    small = ["model.blocks=1", "model.hidden=8", "model.fc_blocks=0", "eval_size=64", "log_every=1"]
    small += ["--batch-size", "8"]
    stop_after(monkeypatch, 3)
    assert run_cli("train", "--preset", "digits", "--out", str(out), "--steps", "6", "lr=0.002", *small) == 130
    monkeypatch.undo()
    hint = capsys.readouterr().out.split("continue with: ")[1].split()
    assert hint == ["iresnet", "train", "--out", str(out), "--resume"]
    assert run_cli(*hint[1:], "--no-progress") == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["preset"], saved["steps"], saved["lr"], saved["batch_size"]) == ("digits", 6, 0.002, 8)
    assert saved["model"]["hidden"] == 8
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())][-2:] == [6, 6]
    assert run_cli("train", "--out", str(out), "--resume", "--steps", "7", "--no-progress") == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["steps"], saved["lr"]) == (7, 0.002)
    assert run_cli("train", "--out", str(out), "--resume", "--preset", "toy") == 2
    assert "is a run of the 'digits' preset, not 'toy'" in capsys.readouterr().err


FAMILY_SETTINGS = ["model.block=densenet", "model.block=monotone", "model.block=implicit", "model.lipschitz=aol"]


@pytest.mark.parametrize("preset", ["toy", "digits"])
@pytest.mark.parametrize("setting", FAMILY_SETTINGS)
def test_family_blocks_train_evaluate_and_sample(
    preset: str, setting: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``model.block=densenet|monotone|implicit`` and ``model.lipschitz=aol``: each trains on the toy
    data and on digits, and the run evaluates and samples (an inversion) from its files."""
    if preset == "digits":
        pytest.importorskip("sklearn")
    out = tmp_path / preset
    small = ["model.blocks=1", "model.hidden=8", "eval_size=64", "--batch-size", "32", "--steps", "3", "--no-progress"]
    assert run_cli("train", "--preset", preset, "--out", str(out), setting, *small) == 0
    key, value = setting.removeprefix("model.").split("=")
    assert json.loads((out / "config.json").read_text())["model"][key] == value
    capsys.readouterr()
    assert run_cli("eval", str(out), "--json") == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["nll"])
    assert run_cli("sample", str(out), "--n", "4") == 0


def test_digits_run_reports_bits_per_dim_beside_baselines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    small = ["model.blocks=1", "model.hidden=8", "model.fc_blocks=0", "eval_size=64", "--batch-size", "32"]
    assert run_cli("train", "--preset", "digits", "--out", str(out), "--steps", "2", "--no-progress", *small) == 0
    printed = capsys.readouterr().out
    assert "bits/dim" in printed
    assert "baseline, independent pixels" in printed and "baseline, full-covariance Gaussian" in printed
    assert run_cli("eval", str(out), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 297  # the whole test split
    assert report["bits_per_dim"] == pytest.approx(report["nll"] / (64 * math.log(2)))
    assert set(report["baselines"]) == {"independent pixels", "full-covariance Gaussian"}
    assert run_cli("sample", str(out), "--n", "9") == 0
    assert (out / "samples.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_iw_reports_the_importance_weighted_bound_apart(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    small = ["model.blocks=1", "model.hidden=8", "eval_size=64", "--batch-size", "32", "--steps", "3", "--no-progress"]
    assert run_cli("train", "--preset", "digits", "--out", str(out), *small) == 0
    capsys.readouterr()
    assert run_cli("eval", str(out), "--iw", "4", "--json", "--seeds", "1") == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["iw"]) == {"k", "bits_per_dim", "bits_per_dim_se", "nll", "nll_se"}
    assert report["iw"]["k"] == 4 and math.isfinite(report["iw"]["bits_per_dim"])
    assert report["iw"]["bits_per_dim"] == pytest.approx(report["iw"]["nll"] / (64 * math.log(2)))
    assert run_cli("eval", str(out), "--iw", "4", "--seeds", "1") == 0
    printed = capsys.readouterr().out.splitlines()
    line = next(text for text in printed if text.startswith("importance-weighted (K=4)"))
    assert "bits/dim (a bound over 4 dequantisation samples" in line and "log-det roulette" in line
    assert printed[0].startswith("test NLL") and "importance-weighted" not in printed[0]  # the single-sample figure
    saved = json.loads((out / "eval.json").read_text())
    assert saved["iw"] == report["iw"] and saved["bits_per_dim"] == report["bits_per_dim"]


def test_eval_iw_needs_a_density_of_images(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("eval", str(trained), "--iw", "2") == 2
    assert "--iw needs a density model of images" in capsys.readouterr().err


def test_train_prints_the_parameter_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("train", "--out", str(tmp_path / "run"), *TINY) == 0
    from iresnet.models import toy_flow

    expected = sum(p.numel() for p in toy_flow(2, blocks=2, hidden=16).parameters())
    assert f"toy preset on 8gaussians: {expected:,} parameters" in capsys.readouterr().out


def is_count(fraction: float, n: int) -> bool:
    """Whether ``fraction`` is some count out of ``n``: a proportion computed from ``n`` items."""
    return abs(fraction * n - round(fraction * n)) < 1e-6 and 0 <= round(fraction * n) <= n


def test_classifier_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--task classify on the digits: accuracy in the metrics, test error in percent from eval."""
    pytest.importorskip("sklearn")
    out = tmp_path / "cls"
    small = ["model.blocks=[1,1]", "model.hidden=[8,8]", "eval_size=64", "--batch-size", "32"]
    # overrides may follow the flags
    assert run_cli("train", "--preset", "digits-classifier", "--out", str(out), "--steps", "3", *small) == 0
    assert "test error" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    (record,) = train_records  # step 3: the mean of three batches of 32
    assert is_count(record["accuracy"], 3 * 32) and "bits_per_dim" not in record
    assert run_cli("eval", str(out), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 297 and report["task"] == "classify"
    error = report["error_percent"] / 100
    assert is_count(error, 297)
    assert report["error_percent_se"] == pytest.approx(100 * math.sqrt(error * (1 - error) / 297))  # binomial
    assert run_cli("sample", str(out)) == 2
    assert "only density and hybrid models can be sampled" in capsys.readouterr().err


def test_threads_flag(capsys: pytest.CaptureFixture) -> None:
    from iresnet.cli import build_parser

    assert build_parser().parse_args(["train", "--threads", "2"]).threads == 2
    assert run_cli("train", "--threads", "0") == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_unknown_arguments_are_refused(capsys: pytest.CaptureFixture) -> None:
    assert run_cli("train", "--stepz", "3") == 2
    assert "unrecognized arguments: --stepz" in capsys.readouterr().err


def test_reconstruct_a_classifier(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "cls"
    small = ["model.blocks=[1,1]", "model.hidden=[8,8]", "eval_size=64", "--batch-size", "32"]
    assert run_cli("train", "--preset", "digits-classifier", "--out", str(out), "--steps", "3", *small) == 0
    capsys.readouterr()
    assert run_cli("reconstruct", str(out), "--n", "4") == 0
    printed = capsys.readouterr().out
    error = float(printed.split("max abs error ")[1].split(",")[0])
    assert error < 1e-2  # intensity levels 0..16
    assert (out / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
    lines = printed.splitlines()
    assert lines[0].split()[:2] == ["block", "certified"] and len(lines) == 1 + 2 + 2  # header, 2 blocks, 2 lines


def test_reconstruct_an_image_flow(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "flow"
    small = ["model.blocks=1", "model.hidden=8", "model.fc_hidden=16", "eval_size=64", "--batch-size", "32"]
    assert run_cli("train", "--preset", "digits", "--out", str(out), "--steps", "3", *small) == 0
    capsys.readouterr()
    assert run_cli("reconstruct", str(out), "--n", "4") == 0
    printed = capsys.readouterr().out
    assert "4 of 4 images and 100.00% of their pixels recovered exactly in levels" in printed
    assert (out / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
    lines = printed.splitlines()
    assert lines[0].split()[:3] == ["block", "kind", "certified"] and len(lines) == 1 + 4 + 2  # 2 x 1 conv, 2 FC


def test_reconstruct_refuses_a_toy_density(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "toy"
    assert run_cli("train", "--out", str(out), "--steps", "2", "model.blocks=1", "eval_size=64") == 0
    capsys.readouterr()
    assert run_cli("reconstruct", str(out)) != 0
    assert "reconstruct inverts a classifier's trunk or an image flow" in capsys.readouterr().err


def test_reconstruct_reports_where_a_plain_resnet_fails() -> None:
    """An unconstrained trunk with large weights: the report names the failure, no exception."""
    import torch

    from iresnet.models import iresnet_classifier
    from iresnet.report.reconstruct import reconstruct

    model = iresnet_classifier((1, 8, 8), 10, levels=17, blocks=(2, 2), hidden=(8, 8), coeff=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(10)
    images = torch.randint(0, 17, (4, 1, 8, 8))
    model(images)
    result = reconstruct(model, images)
    assert result.images is None and result.failure.startswith("fixed_point: fixed-point inversion")
    assert all(block.bound > 1 for block in result.blocks)
    assert result.blocks[-1].iterations["fixed_point"] is None


BAD_COUNTS = [["sample", "RUN", "--n", "0"], ["reconstruct", "RUN", "--n", "-3"], ["eval", "RUN", "--batch-size", "0"]]
BAD_COUNTS += [["eval", "RUN", "--iw", "0"]]


@pytest.mark.parametrize("command", BAD_COUNTS)
def test_counts_must_be_positive(command: list[str], capsys: pytest.CaptureFixture) -> None:
    assert run_cli(*command) == 2
    assert "must be at least 1" in capsys.readouterr().err


BAD_DEMOS = [
    (["--dim", "0"], "argument --dim: must be at least 1, got 0"),
    (["--hidden", "-3"], "argument --hidden: must be at least 1, got -3"),
    (["--hidden", "wide"], "argument --hidden: must be an integer of at least 1, got 'wide'"),
    (["--coeff", "1"], "argument --coeff: must be a number in (0, 1), got '1'"),
    (["--coeff", "0"], "argument --coeff: must be a number in (0, 1), got '0'"),
    (["--coeff", "nan"], "argument --coeff: must be a number in (0, 1), got 'nan'"),
    (["--coeff", "high"], "argument --coeff: must be a number in (0, 1), got 'high'"),
]


@pytest.mark.parametrize("arguments, message", BAD_DEMOS)
def test_bad_demo_values_are_refused_by_the_parser(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert run_cli("demo", *arguments) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, message",
    [
        ("model.hidden=-3", "hidden must be an integer of at least 1, got -3"),
        ("model.coeff=1.5", "coeff must be a number in (0, 1)"),
        ("model.hiden=3", "unknown model option 'hiden' for toy_flow; its options: blocks, hidden, depth"),
    ],
)
def test_bad_model_options_are_messages(option: str, message: str, tmp_path: Path, capsys) -> None:
    assert run_cli("train", "--out", str(tmp_path / "run"), *TINY, option) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_hybrid_run_semi_supervised(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--task hybrid --lambda --labelled-fraction: eval reports the error and bits/dim together;
    the hybrid's flow samples and scores OOD data like a density model."""
    pytest.importorskip("sklearn")
    out = tmp_path / "hybrid"
    small = ["model.scales=2", "model.blocks=1", "model.hidden=8", "model.fc_blocks=0"]
    flags = ["--preset", "digits", "--task", "hybrid", "--lambda", "0.5", "--labelled-fraction", "0.2"]
    flags += ["--out", str(out), "--steps", "3", "--batch-size", "32", "--no-progress"]
    assert run_cli("train", *flags, *small) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["task"], saved["hybrid_lambda"], saved["labelled_fraction"]) == ("hybrid", 0.5, 0.2)
    capsys.readouterr()
    assert run_cli("eval", str(out)) == 0
    printed = capsys.readouterr().out
    assert "test error" in printed and "bits/dim" in printed and "baseline, independent pixels" in printed
    assert run_cli("eval", str(out), "--json", "--ood", "noise") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "hybrid" and report["n"] == 297
    assert is_count(report["classifier"]["error_percent"] / 100, 297)
    assert report["bits_per_dim"] == pytest.approx(report["nll"] / (64 * math.log(2)))
    assert report["ood"]["auroc"] > 0.9  # three steps already give noise a far lower likelihood
    assert run_cli("eval", str(out), "--ood", "noise") == 0
    assert "bits/dim (log-det roulette, 20 exact terms, geometric(0.5) tail, 4 probes)" in capsys.readouterr().out
    last_test = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last_test["split"] == "test"  # eval repeats training's evaluation: the same noise and probes
    assert report["bits_per_dim"] == pytest.approx(last_test["bits_per_dim"], rel=1e-6)  # float32 sums
    assert report["classifier"]["error_percent"] == pytest.approx(last_test["error_percent"])
    assert run_cli("sample", str(out), "--n", "4") == 0
    assert (out / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert run_cli("sample", str(out), "--by-class") == 2  # a linear classifier: no class-conditional prior
    assert "--by-class needs a hybrid with a class-conditional prior" in capsys.readouterr().err
    capsys.readouterr()
    assert run_cli("reconstruct", str(out), "--n", "4") == 0  # through its flow (it was refused)
    assert "4 of 4 images and 100.00% of their pixels recovered exactly in levels" in capsys.readouterr().out


def test_class_conditional_samples_a_row_per_class(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "gmm"
    small = ["model.blocks=1", "model.hidden=8", "model.fc_blocks=0", "eval_size=64", "--batch-size", "32"]
    small += ["--steps", "2", "--no-progress"]
    assert run_cli("train", "--preset", "digits-hybrid", "--out", str(out), *small) == 0
    capsys.readouterr()
    assert run_cli("sample", str(out), "--by-class", "--n", "3") == 0
    assert "30 samples at temperature 1 written" in capsys.readouterr().out
    with Image.open(out / "samples.png") as picture:  # 10 rows of 3 tiles of 64 px, 2-px padding
        assert picture.size == (3 * 64 + 2 * 2, 10 * 64 + 9 * 2)


@pytest.mark.parametrize("command", ["train", "eval", "sample", "reconstruct"])
@pytest.mark.parametrize("device, message", [("cuda", "no CUDA GPU is available"), ("gpu", "a GPU is 'cuda' here")])
def test_a_device_that_cannot_be_had_is_a_message(
    command: str, device: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, here or on one
    run = tmp_path / "run"
    arguments = ["--out", str(run), *TINY] if command == "train" else [str(run)]
    assert run_cli(command, *arguments, "--device", device) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()  # refused before anything was written


def test_device_defaults_to_auto() -> None:
    from iresnet.cli import build_parser
    from iresnet.train import TrainConfig

    parser = build_parser()
    assert [parser.parse_args([command, "RUN"]).device for command in ("eval", "sample", "reconstruct")] == ["auto"] * 3
    assert TrainConfig().device == "auto"


def test_a_corrupt_model_safetensors_falls_back_to_the_checkpoint(trained: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "model.safetensors").write_bytes(b"not safetensors at all")
    assert run_cli("eval", str(run)) == 0
    captured = capsys.readouterr()
    assert "test NLL" in captured.out
    warning = f"iresnet: warning: {run / 'model.safetensors'} cannot be read as safetensors"
    assert warning in captured.err and f"the weights come from {run / 'checkpoint.pt'} instead" in captured.err
    assert run_cli("sample", str(run), "--n", "4") == 0
    assert "cannot be read as safetensors" in capsys.readouterr().err


def test_a_new_run_refuses_a_directory_of_other_files(tmp_path: Path, capsys) -> None:
    """``--out`` naming a folder of the user's once trained into it, writing samples.png over
    theirs; an empty ``--out`` trained into the current directory."""
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "samples.png").write_text("precious")
    assert run_cli("train", "--out", str(folder), *TINY) == 2
    error = capsys.readouterr().err
    assert f"{folder} is not empty and holds no run (samples.png)" in error and "Choose another --out" in error
    assert [p.name for p in folder.iterdir()] == ["samples.png"] and (folder / "samples.png").read_text() == "precious"
    (tmp_path / "afile").write_text("x")
    assert run_cli("train", "--out", str(tmp_path / "afile"), *TINY) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert run_cli("train", "--out", "", *TINY) == 2
    assert "out must name a run directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("train", "--out", str(empty), *TINY) == 0  # an empty folder is a new run's


def test_an_inverse_that_fails_in_trainings_evaluation_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """A monotone or implicit block solves in its evaluation: where that fails during training,
    the command once died with KeyError: 'train' in its own error handling."""
    from iresnet.core.inverse import InversionError
    from iresnet.tasks.density import DensityTask

    def unsolved(*args, **kwargs):
        raise InversionError("fixed-point inversion (fixed_point) failed for 3 of 500 samples after 2 iterations")

    monkeypatch.setattr(DensityTask, "evaluate", unsolved)
    run = tmp_path / "run"
    assert run_cli("train", "--out", str(run), *TINY) == 1
    error = capsys.readouterr().err
    assert error.startswith("iresnet train: error: the inverse did not converge: fixed-point inversion")
    if sys.version_info >= (3, 11):  # the note of what was saved joins the line; before, engine prints it
        assert error.count("\n") == 1
    assert f"the training up to it is saved in {run / 'checkpoint.pt'}" in error


def test_a_resumed_run_not_finished_is_used_at_its_checkpoints_step(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A finished run resumed for more steps and stopped keeps its old model.safetensors (step 4)
    beside a checkpoint of step 6: eval, sample and the API use the checkpoint and say so (they
    used the old weights without a word); once the run finishes, its new weights again."""
    import torch

    from iresnet.train import load_run

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    stop_after(monkeypatch, 6)
    assert run_cli("train", "--out", str(run), "--resume", "--steps", "9", "--no-progress") == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert run_cli("eval", str(run), "--seeds", "1") == 0
    captured = capsys.readouterr()
    said = f"iresnet: warning: {run / 'checkpoint.pt'} holds step 6, later than {run / 'model.safetensors'} (step 4)"
    assert said in captured.err and f"iresnet train --out {run} --resume" in captured.err
    assert run_cli("sample", str(run), "--n", "4") == 0
    assert "holds step 6" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="the weights of step 6 are used"):
        model, _ = load_run(run)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    expected = {**checkpoint["model"], **checkpoint["ema"]["shadow"]}
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())

    assert run_cli("train", "--out", str(run), "--resume", "--no-progress") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _ = load_run(run)  # the finished run's weights, step 9, with nothing to say
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 9


def test_weights_that_do_not_fit_the_config_fall_back_to_the_checkpoint(trained: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from iresnet.train import load_run

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    save_file({"somebody.else": torch.zeros(3)}, str(run / "model.safetensors"))
    with pytest.warns(UserWarning, match=r"does not fit the model config.json describes: tensors \d+ missing"):
        model, _ = load_run(run)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    expected = {**checkpoint["model"], **checkpoint["ema"]["shadow"]}
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())


def test_a_weight_of_another_shape_falls_back_and_a_classifier_run_loads(trained: Path, tmp_path: Path) -> None:
    """Shapes are load_state_dict's to judge: a convolution's power-iteration vectors are empty
    in a new model and take the saved shape, a dense layer's weight must match."""
    pytest.importorskip("sklearn")
    import torch
    from safetensors.torch import load_file, save_file

    from iresnet.train import load_run, resolve_config, train

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    weights = load_file(str(run / "model.safetensors"))
    name = next(name for name in weights if name.endswith("original"))
    save_file({**weights, name: torch.zeros(3, 3)}, str(run / "model.safetensors"))
    with pytest.warns(UserWarning, match=f"does not fit the model config.json describes: size mismatch for {name}"):
        load_run(run)
    small = {"model": {"blocks": [1, 1], "hidden": [8, 8]}, "eval_size": 64, "batch_size": 32, "steps": 1}
    classifier = train(resolve_config("digits-classifier", None, [small, {"out": str(tmp_path / "c")}]), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_run(classifier.run_dir)


def test_when_neither_weights_file_is_usable_the_error_names_both(trained: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "model.safetensors").write_bytes(b"")
    (run / "checkpoint.pt").write_bytes(b"garbage" * 10)
    assert run_cli("eval", str(run)) == 2
    error = capsys.readouterr().err
    assert f"no usable weights in {run}" in error
    assert f"{run / 'model.safetensors'} cannot be read as safetensors" in error
    assert f"{run / 'checkpoint.pt'} cannot be read as a PyTorch checkpoint (UnpicklingError)" in error
    assert "weights_only=False" not in error  # torch's advice for files one trusts


BAD_CONFIG_FILES = [
    ('{\n  "steps": 3,\n  "lr": 0.01,\n}\n', ", line 4, column 1: not valid JSON: Expecting property name"),
    ('{\n  "steps": 3,\n  "lrate": 0.01\n}\n', ", line 3: unknown setting 'lrate'; known settings: augment"),
    ("[3, 0.01]", ": expected a JSON object of settings, {...}, got a list"),
    ("", ", line 1, column 1: not valid JSON: Expecting value"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIG_FILES, ids=["trailing comma", "unknown", "a list", "empty"])
def test_a_bad_config_file_is_named_with_the_line(text: str, message: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "my.json"
    path.write_text(text)
    assert run_cli("train", "--config", str(path), "--out", str(tmp_path / "run")) == 2
    assert f"{path}{message}" in capsys.readouterr().err


def test_a_damaged_run_config_is_named_with_the_line(trained: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = run / "config.json"
    saved = config.read_text()
    config.write_text(saved[: saved.index('"steps"')])  # cut short, as a full disk leaves it
    assert run_cli("eval", str(run)) == 2
    lines = saved[: saved.index('"steps"')].count("\n")
    assert f"{config}, line {lines + 1}, column 3: not valid JSON" in capsys.readouterr().err
    config.write_text(saved.replace('"steps"', '"stepz"'))
    assert run_cli("sample", str(run)) == 2
    line = saved[: saved.index('"steps"')].count("\n") + 1
    assert f"{config}, line {line}: unknown setting 'stepz'" in capsys.readouterr().err
    config.write_text(saved.replace('"steps": 4', '"steps": "four"'))
    assert run_cli("eval", str(run)) == 2
    assert f"{config}: steps must be an integer, got 'four'" in capsys.readouterr().err
    config.write_bytes(b"\x80\x03" + bytes(10))
    assert run_cli("eval", str(run)) == 2
    assert f"{config}: not a JSON file (not UTF-8 text: byte 0 is 0x80)" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["model.=3", "=3", "steps"])
def test_a_malformed_override_is_named(override: str, tmp_path: Path, capsys) -> None:
    assert run_cli("train", "--out", str(tmp_path / "run"), override) == 2
    assert f"an override must look like key=value or model.key=value, got {override!r}" in capsys.readouterr().err


def unwritable(path: Path) -> Path:
    """``path`` made a folder, which no file can be written over (also as root, whom the mode
    bits of a read-only folder do not stop)."""
    path.unlink(missing_ok=True)
    path.mkdir()
    return path


@pytest.mark.parametrize("as_json", [False, True])
def test_eval_prints_its_result_even_where_eval_json_cannot_be_written(
    as_json: bool, trained: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    unwritable(run / "eval.json")
    assert run_cli("eval", str(run), *(["--json"] if as_json else [])) == 0  # the answer was given
    captured = capsys.readouterr()
    if as_json:
        assert json.loads(captured.out)["n"] == 500
    else:
        assert "test NLL" in captured.out
    assert f"iresnet eval: warning: cannot write {run / 'eval.json'}: Is a directory" in captured.err


def test_sample_names_the_picture_it_cannot_write(trained: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    unwritable(run / "samples.png")
    assert run_cli("sample", str(run), "--n", "4") == 1
    captured = capsys.readouterr()
    assert f"iresnet sample: error: cannot write {run / 'samples.png'}: Is a directory" in captured.err
    assert "samples written" not in captured.out


def test_ood_figures_are_printed_where_their_picture_cannot_be_written(tmp_path: Path, capsys) -> None:
    pytest.importorskip("sklearn")
    run = tmp_path / "digits"
    small = ["model.scales=2", "model.blocks=1", "model.hidden=8", "model.fc_blocks=0", "eval_size=64"]
    assert run_cli("train", "--preset", "digits", "--out", str(run), "--steps", "1", "--batch-size", "32", *small) == 0
    unwritable(run / "ood-noise.png")
    capsys.readouterr()
    assert run_cli("eval", str(run), "--ood", "noise", "--json") == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["ood"]["auroc"] > 0.9 and report["ood"]["picture"] is None
    assert json.loads((run / "eval.json").read_text()) == report
    assert f"iresnet eval: error: cannot write {run / 'ood-noise.png'}: Is a directory" in captured.err
    assert run_cli("eval", str(run), "--ood", "noise") == 1
    assert "AUROC" in capsys.readouterr().out


def test_reconstruct_names_the_picture_it_cannot_write(tmp_path: Path, capsys) -> None:
    pytest.importorskip("sklearn")
    run = tmp_path / "cls"
    small = ["model.blocks=[1,1]", "model.hidden=[8,8]", "eval_size=64", "--batch-size", "32", "--no-progress"]
    assert run_cli("train", "--preset", "digits-classifier", "--out", str(run), "--steps", "1", *small) == 0
    capsys.readouterr()
    assert run_cli("reconstruct", str(run), "--n", "4", "--out", str(unwritable(tmp_path / "r.png"))) == 1
    captured = capsys.readouterr()
    assert "max abs error" not in captured.out
    assert f"iresnet reconstruct: error: cannot write {tmp_path / 'r.png'}: Is a directory" in captured.err


def test_version(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    import iresnet

    assert run_cli("--version") == 0
    assert capsys.readouterr().out == f"iresnet {importlib.metadata.version('iresnet')}\n"

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)  # run from a source tree
    assert run_cli("--version") == 0
    assert capsys.readouterr().out == f"iresnet {iresnet.__version__}\n"


def test_train_help_lists_every_setting_and_model_option_with_its_default(capsys: pytest.CaptureFixture) -> None:
    """Each KEY=VALUE of the help, read back as an override, is the default."""
    import dataclasses

    from iresnet.models import hybrid_model, image_flow, iresnet_classifier, toy_flow
    from iresnet.models.build import model_options
    from iresnet.train import TrainConfig, parse_override

    assert run_cli("train", "--help") == 0
    text = capsys.readouterr().out
    settings, models = text.split("\nsettings, KEY=VALUE")[1].split("\nmodel options, model.KEY=VALUE")
    listed = {}
    for token in settings.split("\n", 1)[1].split():
        listed.update(parse_override(token))
    assert listed == TrainConfig().to_dict()
    assert [f.name for f in dataclasses.fields(TrainConfig)] == list(listed)  # in the order of the class
    sections = re.split(r"\n  (?=\S)", models)[1:]  # a title indented by 2, its options by 4
    for section, builder in zip(sections, [toy_flow, image_flow, hybrid_model, iresnet_classifier], strict=True):
        title, tokens = section.split("\n", 1)
        assert builder.__name__ in title
        listed = {}
        for token in tokens.split():
            listed.update(parse_override(f"model.{token}")["model"])
        defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in model_options(builder).items()}
        assert listed == ({"classifier": "linear"} if builder is hybrid_model else defaults)


def test_eval_says_where_it_wrote_its_report(trained: Path, capsys: pytest.CaptureFixture) -> None:
    (trained / "eval.json").unlink(missing_ok=True)
    assert run_cli("eval", str(trained)) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"report written to {trained / 'eval.json'}"
    assert (trained / "eval.json").exists()
    assert run_cli("eval", str(trained), "--json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 500  # standard output: the JSON alone
    assert captured.err.splitlines()[-1] == f"report written to {trained / 'eval.json'}"


def test_model_lipschitz_aol_trains_toy_and_digits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``model.lipschitz=aol`` reaches every branch layer of the toy and the digits flows; the
    run trains, and ``eval`` rebuilds the AOL model from its config."""
    pytest.importorskip("sklearn")
    from iresnet.core.aol import aol_layers
    from iresnet.core.lipschitz import spectral_norms
    from iresnet.models.build import build_model

    small = ["model.lipschitz=aol", "--no-progress", "eval_size=64", "--batch-size", "16", "--steps", "3"]
    runs = {"toy": [*small, "model.blocks=2", "model.hidden=16"]}
    runs["digits"] = [*small, "--preset", "digits", "model.blocks=1", "model.hidden=8", "model.fc_blocks=1"]
    for name, args in runs.items():
        out = tmp_path / name
        assert run_cli("train", "--out", str(out), *args) == 0
        saved = json.loads((out / "config.json").read_text())
        assert saved["model"]["lipschitz"] == "aol"
        capsys.readouterr()
        assert run_cli("eval", str(out), "--json") == 0
        assert math.isfinite(json.loads(capsys.readouterr().out)["nll"])
    model = build_model("density", "8gaussians", {"blocks": 1, "hidden": 8, "lipschitz": "aol"})
    assert list(aol_layers(model)) and not list(spectral_norms(model))


def too_few_iterations(trained: Path, tmp_path: Path) -> Path:
    """A copy of ``trained`` whose inverse may take one iteration (as a resume with model.max_iter=1 leaves it)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    settings = json.loads((run / "config.json").read_text())
    settings["model"]["max_iter"] = 1
    (run / "config.json").write_text(json.dumps(settings))
    return run


def test_sample_says_in_one_line_that_the_inverse_did_not_converge(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = too_few_iterations(trained, tmp_path)
    assert run_cli("sample", str(run), "--n", "8", "--out", str(tmp_path / "s.png")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iresnet sample: error: no samples were drawn: the inverse did not")
    assert err[0].endswith(f"(model.max_iter is 1): iresnet train --out {run} --resume model.max_iter=100")
    assert not (tmp_path / "s.png").exists()


def test_eval_reports_the_figures_and_the_inverse_check_as_failed(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = too_few_iterations(trained, tmp_path)
    assert run_cli("eval", str(run), "--seeds", "1") == 1
    out, err = capsys.readouterr()
    assert "test NLL" in out and "FAILED: 64 test inputs to the latent and back: fixed-point inversion" in out
    assert err.strip().splitlines()[-1].startswith("iresnet eval: error: the report card's inverse check failed")
    assert "Traceback" not in err and "--resume model.max_iter=100" in err
    report = json.loads((run / "eval.json").read_text())
    assert report["nll"] > 0 and report["card"]["reconstruction"]["failure"].startswith("fixed-point inversion")
    assert report["card"]["reconstruction"]["max_abs_error"] is None


@pytest.mark.parametrize(
    ("flag", "where", "message"),
    [
        ("--out", "afile", "{tmp}/afile is a file, not a directory: choose another --out"),
        ("--out", "afile/x", "cannot make the run directory {tmp}/afile/x: Not a directory; choose another --out"),
        ("--out", "dangling", "cannot make the run directory {tmp}/dangling: No such file or directory; choose"),
        ("--config", "adir", "{tmp}/adir is a directory, not a JSON file of settings"),
        ("--config", "afile/x", "{tmp}/afile/x: cannot read it: Not a directory"),
    ],
)
def test_a_path_that_cannot_be_used_is_refused_before_training(
    flag: str, where: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # a link to nothing: mkdir fails
    before = sorted(tmp_path.rglob("*"))
    out = [] if flag == "--out" else ["--out", str(tmp_path / "run")]
    assert run_cli("train", flag, str(tmp_path / where), *out, *TINY) == 2
    err = capsys.readouterr().err
    assert err.startswith("iresnet train: error: " + message.format(tmp=tmp_path)) and err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_runs_a_file_is_refused_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """Without --out the run goes under runs/, which claimed_run makes: a file there is its refusal."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("")
    assert run_cli("train", *TINY) == 2
    said = "iresnet train: error: cannot make the run directory runs/toy: Not a directory; choose another --out"
    assert capsys.readouterr().err == said + "\n"


@pytest.mark.parametrize(
    ("command", "where", "name"),
    [
        ("eval", "iresnet.report.evaluation", "evaluate_run"),
        ("sample", "iresnet.report.pictures", "sample_run"),
        ("reconstruct", "iresnet.report.reconstruct", "reconstruct_run"),
        ("fid", "iresnet.report.fid", "fid_run"),
        ("train", "iresnet.train", "resolve_config"),  # train's start-up, before training runs
    ],
)
def test_ctrl_c_in_any_command_is_one_line_and_exit_130(
    command: str, where: str, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(f"{where}.{name}", pressed)
    extra = {"fid": ["--weights", "w.pth"], "train": ["--no-progress"]}.get(command, ["RUN"])
    assert run_cli(command, *(["RUN"] if command == "fid" else []), *extra) == 130
    assert capsys.readouterr().err == f"iresnet {command}: interrupted\n"


def test_ctrl_c_while_the_command_imports_torch_is_one_line(trained: Path) -> None:
    """A real SIGINT while ``python -m iresnet`` still imports the package (torch): no traceback,
    no death by the signal, but the command's line and exit 130."""
    source = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-X", "importtime", "-m", "iresnet", "eval", str(trained), "--seeds", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stderr is not None
    for line in process.stderr:  # -X importtime: a line as each module is imported
        if line.split("|")[-1].strip() == "torch":  # torch is loaded; the package is not yet
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "\niresnet eval: interrupted\n" in stderr and "Traceback" not in stderr  # among -X importtime's lines


CPU_ALLOCATOR = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 400000000 bytes. Error code 12 (Cannot allocate memory)"
)


def test_a_model_that_does_not_fit_in_memory_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """model.hidden=100000000 fails in the allocator while the model is built (as here, without
    asking a test machine for that memory): one line, exit 2, no run directory."""
    from iresnet.tasks import get_task

    def allocating(*args, **kwargs):
        raise RuntimeError(CPU_ALLOCATOR)

    monkeypatch.setattr(type(get_task("density")), "build_model", allocating)
    assert run_cli("train", "--out", str(tmp_path / "run"), *TINY, "model.hidden=100000000") == 2
    err = capsys.readouterr().err
    assert err.startswith("iresnet train: error: the model does not fit in memory on cpu: an allocation of ")
    assert "400,000,000 bytes failed" in err and "choose smaller model settings" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_running_out_of_memory_elsewhere_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torch

    def evaluating(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...")

    monkeypatch.setattr("iresnet.report.evaluation.evaluate_run", evaluating)
    assert run_cli("eval", "RUN") == 1
    err = capsys.readouterr().err
    assert err.startswith("iresnet eval: error: out of memory: an allocation of 2.00 GiB failed; choose a smaller")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
        (["--lambda", "inf"], "hybrid_lambda must be a finite number >= 0, got inf"),
        (["warmup_steps=-1"], "warmup_steps must be at least 0, got -1"),
        (["seed=99999999999999999999999"], "seed must lie strictly between -2**43 and 2**43 (8,796,093,022,208)"),
        (["--seed", str(2**63 - 1)], "seed must lie strictly between -2**43 and 2**43"),
    ],
)
def test_settings_out_of_range_are_refused_before_anything_is_written(
    setting: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run_cli("train", "--out", str(tmp_path / "run"), *TINY, *setting) == 2
    assert capsys.readouterr().err.startswith(f"iresnet train: error: {message}")
    assert not (tmp_path / "run").exists()


def test_a_sample_seed_beyond_64_bits_is_refused_by_the_parser(capsys: pytest.CaptureFixture) -> None:
    assert run_cli("sample", "RUN", "--seed", "99999999999999999999999") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("iresnet sample: error: argument --seed: must be an integer from -2**63 to 2**64 - 1")


def test_fid_checks_the_run_before_the_weights(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("fid", str(trained), "--weights", str(tmp_path / "missing.pth")) == 2
    err = capsys.readouterr().err
    assert err == f"iresnet fid: error: {trained} was trained on '8gaussians': the FID compares images\n"


def test_eval_with_one_seed_prints_no_spread(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("eval", str(trained), "--seeds", "1", "--json") == 0
    card = json.loads(capsys.readouterr().out)["card"]
    assert card["std"] is None and len(card["per_seed"]) == 1
    assert run_cli("eval", str(trained), "--seeds", "1") == 0
    printed = capsys.readouterr().out
    assert "nan" not in printed and re.search(r"test +[\d.]+ nats \(one seed; exact\)", printed)


def test_resume_says_the_checkpoint_of_a_finished_run_is_missing(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "checkpoint.pt").unlink()
    assert run_cli("train", "--out", str(run), "--resume", "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"iresnet train: error: nothing to resume: the checkpoint {run / 'checkpoint.pt'} is missing")
    assert "before its first checkpoint" not in err


def test_resume_with_fewer_steps_than_done_trains_nothing_and_changes_nothing(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.name != ".lock"}
    assert run_cli("train", "--out", str(run), "--resume", "--steps", "2", "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"iresnet train: error: nothing to train: {run} is at step 4, beyond steps=2; give more")
    assert err.count("\n") == 1
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.name != ".lock"} == before


def test_sample_refuses_a_picture_name_other_than_png(trained: Path, tmp_path: Path, capsys) -> None:
    assert run_cli("sample", str(trained), "--n", "8", "--out", str(tmp_path / "x.jpg")) == 2
    assert (
        capsys.readouterr().err
        == f"iresnet sample: error: --out {tmp_path / 'x.jpg'}: samples are written as PNG: name a .png file\n"
    )
    assert not list(tmp_path.iterdir())
