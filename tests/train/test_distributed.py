"""``torchrun --nproc-per-node 2 -m iresnet train`` (gloo, CPU) trains the same model as one
process: each process takes half of every batch, DistributedDataParallel averages the
gradients, ActNorm initialises from the statistics of the whole batch. And which device a
process gets: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, with clear errors for the rest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iresnet.train import resolve_config, train
from iresnet.train.distributed import process_device, resolve_device

SETTINGS = ["--steps", "6", "--batch-size", "64", "--no-progress", "model.blocks=2", "model.hidden=16"]
SETTINGS += ["eval_size=500", "log_every=1", "eval_every=3", "ema_decay=0.9"]


def losses(run: Path) -> list[float]:
    return [r["nll"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def torchrun(*arguments: str) -> subprocess.CompletedProcess[str]:
    """``torchrun`` with two processes on this machine, one thread each."""
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if launcher is None:
        pytest.fail("torchrun, installed with torch, was not found")
    command = [launcher, "--standalone", "--nproc-per-node", "2", *arguments]  # standalone: a free port of its own
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_two_processes_train_like_one(tmp_path: Path) -> None:
    done = torchrun("-m", "iresnet", "train", "--out", str(tmp_path / "two"), *SETTINGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run written to") == 1  # only rank 0 reports

    overrides = [{"steps": 6, "batch_size": 64, "out": str(tmp_path / "one"), "eval_size": 500, "log_every": 1}]
    overrides += [{"eval_every": 3, "ema_decay": 0.9, "model": {"blocks": 2, "hidden": 16}}]
    train(resolve_config("toy", None, overrides), progress=False)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 8  # 6 train and 2 test records
    assert one == pytest.approx(two, rel=1e-5)
    assert (tmp_path / "two/model.safetensors").exists()


FAILING_EVALUATION = """
import sys
from iresnet.cli import main
from iresnet.tasks.density import DensityTask

def failing(*args, **kwargs):
    raise RuntimeError("linalg.svd: The algorithm failed to converge")

DensityTask.evaluate = failing
main(sys.argv[1:])
"""


def test_an_evaluation_that_raises_under_torchrun_saves_the_training_first(tmp_path: Path) -> None:
    """The main process alone evaluates; where that raises, both processes save the steps so far
    together (a checkpoint is collective) before they stop, and the resumed run evaluates that
    step first, then trains on exactly as an uninterrupted run does."""
    script = tmp_path / "failing_evaluation.py"
    script.write_text(FAILING_EVALUATION)
    run = tmp_path / "run"
    failed = torchrun(str(script), "train", "--out", str(run), *SETTINGS, "checkpoint_every=100")
    assert failed.returncode != 0
    assert "the evaluation at step 3 failed" in failed.stderr and "--resume evaluates that step" in failed.stderr
    assert "failed in the main process (rank 0)" in failed.stderr  # the other process says why it stopped
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3 and checkpoint["evaluation_due"] and len(checkpoint["rng"]) == 2

    resumed = torchrun("-m", "iresnet", "train", "--out", str(run), "--resume", *SETTINGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = torchrun("-m", "iresnet", "train", "--out", str(tmp_path / "whole"), *SETTINGS)
    assert whole.returncode == 0, whole.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "test"] == [3, 6]
    assert losses(run) == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)


def test_under_torchrun_a_refused_directory_stops_every_process_with_its_line(tmp_path: Path) -> None:
    """The main process decides; every process raises its refusal (the other once died in the
    collective that follows, with a traceback, when torchrun stopped it)."""
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "samples.png").write_text("precious")
    refused = torchrun("-m", "iresnet", "train", "--out", str(folder), *SETTINGS)
    assert refused.returncode != 0
    said = f"iresnet train: error: {folder} is not empty and holds no run (samples.png)"
    assert refused.stderr.count(said) == 2 and refused.stderr.count("exitcode  : 2") == 2
    assert "[rank1]:" not in refused.stderr  # no traceback of a process
    assert [p.name for p in folder.iterdir()] == ["samples.png"]


def gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Pretend the machine has ``count`` CUDA GPUs (only the answers of torch.cuda change)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_is_cuda_where_a_gpu_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    gpus(monkeypatch, 1)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize(
    "name, count, message",
    [
        ("cuda", 0, r"device 'cuda': no CUDA GPU is available .*use --device cpu, or --device auto"),
        ("cuda:1", 0, "no CUDA GPU is available"),
        ("cuda:1", 1, "device 'cuda:1': there is no such GPU, this machine has 1"),
        ("gpu", 1, r"device 'gpu': a GPU is 'cuda' here \(or 'auto'\)"),
        ("banana", 1, r"unknown device 'banana'; choose auto \(CUDA .*\), cpu, cuda, cuda:N"),
        ("cuda:x", 1, "unknown device 'cuda:x'"),
        ("meta", 1, "device 'meta' is not supported; choose auto"),
    ],
)
def test_devices_that_cannot_be_had_are_messages(monkeypatch, name: str, count: int, message: str) -> None:
    gpus(monkeypatch, count)
    with pytest.raises(ValueError, match=message):
        resolve_device(name)


def test_under_torchrun_auto_takes_a_gpu_only_if_every_process_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    gpus(monkeypatch, 2)
    assert process_device("auto") == process_device("cuda") == torch.device("cuda", 1)
    gpus(monkeypatch, 1)
    assert process_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="2 processes on this machine need a GPU each, and it has 1"):
        process_device("cuda")
