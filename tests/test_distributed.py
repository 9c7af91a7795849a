"""``torchrun --nproc-per-node 2 -m iresnet train`` (gloo, CPU) trains the same model as one
process: each process takes half of every batch, DistributedDataParallel averages the
gradients, ActNorm initialises from the statistics of the whole batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iresnet.train import resolve_config, train

SETTINGS = ["--steps", "6", "--batch-size", "64", "--no-progress", "model.blocks=2", "model.hidden=16"]
SETTINGS += ["eval_size=500", "log_every=1", "eval_every=3", "ema_decay=0.9"]


def losses(run: Path) -> list[float]:
    return [r["nll"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_two_processes_train_like_one(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.fail("torchrun, installed with torch, was not found")
    command = [torchrun, "--standalone", "--nproc-per-node", "2"]  # standalone: a free port of its own
    command += ["-m", "iresnet", "train", "--out", str(tmp_path / "two"), *SETTINGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run written to") == 1  # only rank 0 reports

    overrides = [{"steps": 6, "batch_size": 64, "out": str(tmp_path / "one"), "eval_size": 500, "log_every": 1}]
    overrides += [{"eval_every": 3, "ema_decay": 0.9, "model": {"blocks": 2, "hidden": 16}}]
    train(resolve_config("toy", None, overrides), progress=False)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 8  # 6 train and 2 test records
    assert one == pytest.approx(two, rel=1e-5)
    assert (tmp_path / "two/model.safetensors").exists()
