"""Runs that meet the world: two at once, kills, signals, full disks and damaged files. Most
tests start ``iresnet train`` as a process of its own and act on it from outside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import iresnet
from iresnet.report.pictures import write_final_files
from iresnet.train import resolve_config, train
from iresnet.train.checkpoint import default_run_directory

SOURCE = str(Path(iresnet.__file__).resolve().parents[1])  # this checkout's, also from another directory
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SOURCE, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
ENV["PYTHONUNBUFFERED"] = "1"  # each line as it is printed
SMALL = ["--no-progress", "model.blocks=2", "model.hidden=16", "eval_size=500", "log_every=1"]
ENDLESS = ["--steps", "1000000", "checkpoint_every=1000000", "eval_every=1000000"]


def start(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "iresnet", "train", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=ENV)


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the run ended or hung first: {process.communicate()}")
        time.sleep(0.02)


def records(run: Path, split: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def last_step(run: Path) -> int:
    """The step of the last complete record of a run that may be writing one now."""
    lines = (run / "metrics.jsonl").read_text().split("\n")[:-1]  # what follows the last newline is partial
    return json.loads(lines[-1])["step"] if lines else 0


def logged(run: Path, n: int) -> Callable[[], bool]:
    """Whether ``run`` has logged at least ``n`` lines of metrics."""
    path = run / "metrics.jsonl"
    return lambda: path.exists() and path.read_text().count("\n") >= n


# -- two runs at once ------------------------------------------------------------------------


def test_default_run_directories_are_claimed_atomically(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        chosen = list(pool.map(lambda _: default_run_directory("toy", False, tmp_path), range(16)))
    assert len(set(chosen)) == 16 and all(path.is_dir() for path in chosen)
    assert default_run_directory("toy", True, tmp_path) == tmp_path / "toy-16"


def test_numbers_follow_the_order_runs_started_in_and_resume_takes_the_latest(tmp_path: Path) -> None:
    """A removed run leaves a gap that a new run does not fill: it once took runs/toy-2 after
    toy-3, and ``--resume`` without ``--out`` then continued the finished toy-3 instead."""
    first, second, third = (default_run_directory("toy", False, tmp_path) for _ in range(3))
    assert [first.name, second.name, third.name] == ["toy", "toy-2", "toy-3"]
    second.rmdir()
    (tmp_path / "toy-x").mkdir()  # not one of the numbered runs
    (tmp_path / "toy-paper-7").mkdir()  # another preset's
    assert default_run_directory("toy", False, tmp_path) == tmp_path / "toy-4"
    assert default_run_directory("toy", True, tmp_path) == tmp_path / "toy-4"
    assert default_run_directory("moons", True, tmp_path) == tmp_path / "moons"  # none yet
    assert default_run_directory("toy", False, tmp_path / "new") == tmp_path / "new/toy"


def test_two_runs_started_together_get_a_directory_each(tmp_path: Path) -> None:
    runs = [start("--data", data, "--steps", "5", *SMALL, cwd=tmp_path) for data in ("8gaussians", "moons")]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    data = {json.loads((tmp_path / "runs" / name / "config.json").read_text())["data"] for name in ("toy", "toy-2")}
    assert data == {"8gaussians", "moons"}
    for name in ("toy", "toy-2"):
        assert [r["step"] for r in records(tmp_path / "runs" / name)] == [1, 2, 3, 4, 5]


def test_a_second_process_in_a_run_directory_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = start("--out", str(out), *ENDLESS, *SMALL)
    try:
        wait_until(logged(out, 3), first)
        for resume in ([], ["--resume"]):
            second = subprocess.run(
                [sys.executable, "-m", "iresnet", "train", "--out", str(out), "--steps", "3", *SMALL, *resume],
                capture_output=True,
                text=True,
                timeout=120,
                env=ENV,
            )
            assert second.returncode == 2, second.stderr
            assert f"{out} is being trained by another process (pid {first.pid})" in second.stderr
            assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 130, err
    finally:
        first.kill()
    steps = [r["step"] for r in records(out)]
    assert steps == list(range(1, len(steps) + 1))  # one run's records, each step once


def test_a_run_that_fails_before_it_starts_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Otherwise the next ``--resume`` would pick the empty directory as the latest run."""
    monkeypatch.chdir(tmp_path)
    unlabelled = [{"task": "classify", "model": {}, "steps": 2}]
    with pytest.raises(ValueError, match="needs labelled image data"):
        train(resolve_config("toy", None, unlabelled), progress=False)
    with pytest.raises(ValueError, match="needs labelled image data"):
        train(resolve_config("toy", None, [*unlabelled, {"out": "mine"}]), progress=False)
    assert not (tmp_path / "runs/toy").exists() and not (tmp_path / "mine").exists()


# -- damaged files and a full disk -----------------------------------------------------------

TINY = {"model": {"blocks": 2, "hidden": 16}, "batch_size": 64, "eval_size": 500, "log_every": 1}


def config(out: Path, **settings):
    return resolve_config("toy", None, [TINY, {"out": str(out)}, settings])


def run_cli(*args: str) -> int:
    from iresnet.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint"])
def test_a_damaged_checkpoint_is_named_on_resume(tmp_path: Path, damage: str, capsys: pytest.CaptureFixture) -> None:
    import torch

    run = tmp_path / "run"
    train(config(run, steps=2), progress=False)
    path = run / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    capsys.readouterr()
    assert run_cli("train", "--out", str(run), "--resume", "--steps", "3", "--no-progress") == 2
    err = capsys.readouterr().err
    expected = "cannot be read" if damage == "truncated" else "is not a training checkpoint of iresnet"
    assert err.startswith(f"iresnet train: error: {path} {expected}") and err.count("\n") == 1


def test_a_half_written_last_metrics_line_is_dropped_on_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(config(run, steps=3), progress=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "split": "tra')  # killed while writing
    with pytest.warns(UserWarning, match="dropped its last line, written only in part"):
        train(config(run, steps=5), resume=True, progress=False)
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 5]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not a record of the run \('garbage'\)"):
        train(config(run, steps=6), resume=True, progress=False)


FULL_DISK = [OSError(28, "No space left on device"), RuntimeError("[enforce fail at inline_container.cc:672] . pos 7")]


@pytest.mark.parametrize("failure", FULL_DISK)
def test_a_full_disk_keeps_the_last_checkpoint_and_removes_the_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, failure: Exception
) -> None:
    import torch

    run = tmp_path / "run"
    train(config(run, steps=2), progress=False)
    before = (run / "checkpoint.pt").read_bytes()

    def failing_save(state, path):
        Path(path).write_bytes(before[: len(before) // 2])  # half written when the disk filled up
        raise failure

    monkeypatch.setattr(torch, "save", failing_save)
    capsys.readouterr()
    assert run_cli("train", "--out", str(run), "--resume", "--steps", "3", "--no-progress") == 1
    err = capsys.readouterr().err
    assert f"could not write {run / 'checkpoint.pt'}" in err and "the disk may be full" in err
    assert "The previous checkpoint.pt is intact, and the partial checkpoint.pt.tmp was removed" in err
    assert "Traceback" not in err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not list(run.glob("*.tmp"))


def test_a_full_disk_while_logging_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from iresnet.train import engine
    from iresnet.train.checkpoint import WriteError

    def full(path, mode="r", *args, **kwargs):
        if mode == "a":
            raise OSError(28, "No space left on device")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(engine, "open", full, raising=False)
    with pytest.raises(WriteError, match=r"metrics.jsonl \(No space left on device\): the disk may be full. No chec"):
        train(config(tmp_path / "run", steps=2), progress=False)


# -- kills -----------------------------------------------------------------------------------


def test_a_killed_run_keeps_a_checkpoint_by_the_clock_and_resumes(tmp_path: Path) -> None:
    """kill -9 long before the step-based checkpoint: the one written by the clock remains, and
    the resumed run logs every step once."""
    import torch

    out = tmp_path / "run"
    run = start("--out", str(out), *ENDLESS, *SMALL, "checkpoint_seconds=0.5")
    checkpoint = out / "checkpoint.pt"
    wait_until(checkpoint.exists, run)
    wait_until(lambda: last_step(out) > torch.load(checkpoint, weights_only=True)["step"], run)
    run.kill()
    run.communicate()
    saved = torch.load(checkpoint, weights_only=True)["step"]
    assert saved >= 1
    assert run_cli("train", "--out", str(out), "--resume", "--steps", str(saved + 2), "--no-progress") == 0
    assert [r["step"] for r in records(out)] == list(range(1, saved + 3))


def test_the_partial_files_of_a_killed_write_are_removed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    train(config(run, steps=2), progress=False)
    (run / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    (run / ".samples.partial.png").write_bytes(b"half a picture")
    capsys.readouterr()
    train(config(run, steps=3), resume=True, progress=False)
    assert "removed checkpoint.pt.tmp, .samples.partial.png in " in capsys.readouterr().out
    assert {path.name for path in run.iterdir() if "tmp" in path.name or "partial" in path.name} == set()


def test_a_new_run_does_not_add_to_the_records_of_one_without_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(config(run, steps=3), progress=False)
    for name in ("checkpoint.pt", "model.safetensors"):  # as if killed before its first checkpoint
        (run / name).unlink()
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="holds metrics.jsonl of an earlier run that stopped before its first"):
        train(config(run, steps=3), progress=False)
    with pytest.raises(FileNotFoundError, match=r"does not exist \(its run stopped before its first checkpoint\)"):
        train(config(run, steps=3), resume=True, progress=False)
    assert (run / "metrics.jsonl").read_text() == before
    (run / "metrics.jsonl").unlink()
    train(config(run, steps=2), progress=False)
    assert [r["step"] for r in records(run)] == [1, 2]


# -- a diverging run -------------------------------------------------------------------------


def test_a_diverging_run_says_where_and_resumes_with_a_lower_learning_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """lr 100 overflows inside the toy flow at once (a layer's input check reports NaN): the
    stop names the step and the checkpoint, and the run continues from it with a lower lr."""
    out = tmp_path / "run"
    first = ["--steps", "2", "warmup_steps=0", "eval_size=500", "log_every=1", "--no-progress"]
    assert run_cli("train", "--out", str(out), *first) == 0
    capsys.readouterr()
    assert run_cli("train", "--out", str(out), "--resume", "--steps", "6", "lr=100", "--no-progress") == 1
    err = capsys.readouterr().err
    assert "training stopped at step 4: values inside the model overflowed (ResidualBlock input: " in err
    assert f"the last checkpoint, {out / 'checkpoint.pt'}, is intact (step 2)" in err
    assert "Lower the learning rate (now 100) or set grad_clip, and continue from the checkpoint, e.g. iresnet " in err
    assert "Traceback" not in err
    assert run_cli("train", "--out", str(out), "--resume", "lr=0.001", "--no-progress") == 0
    assert "lr 0.005 -> 0.001" in capsys.readouterr().out
    assert [(r["step"], r["lr"]) for r in records(out)] == [(1, 0.005), (2, 0.005), *[(s, 0.001) for s in range(3, 7)]]


def test_a_solve_that_does_not_converge_in_training_says_so_and_resumes_with_more_room(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A monotone block solves a fixed point in every forward pass: with too few iterations allowed
    the run stops with a message (no traceback) naming the step, the checkpoint and the solver
    options to raise, and continues from the checkpoint with them (they change how the step is
    solved, not what is trained)."""
    out = tmp_path / "run"
    model = ["model.block=monotone", "model.blocks=2", "model.hidden=16"]
    first = ["--steps", "2", "warmup_steps=0", "eval_size=500", "log_every=1", "--no-progress", *model]
    assert run_cli("train", "--out", str(out), *first) == 0
    capsys.readouterr()
    assert run_cli("train", "--out", str(out), "--resume", "--steps", "4", "model.max_iter=1", "--no-progress") == 1
    err = capsys.readouterr().err
    assert "training stopped at step 3: a block's fixed-point solve did not converge (fixed-point inversion" in err
    assert f"the last checkpoint, {out / 'checkpoint.pt'}, is intact (step 2)" in err
    assert f"iresnet train --out {out} --resume model.max_iter=100\n" in err
    assert "Traceback" not in err
    assert run_cli("train", "--out", str(out), "--resume", "model.max_iter=100", "--no-progress") == 0
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    assert run_cli("train", "--out", str(out), "--resume", "--steps", "5", "model.hidden=8", "--no-progress") == 2
    assert "cannot resume with different settings for model" in capsys.readouterr().err


# -- signals ---------------------------------------------------------------------------------


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Two real SIGINTs in step 5 (checkpoints every 2 steps): one line, exit 130, the checkpoint
    of step 4, and the printed command continues from it."""
    from iresnet.train.engine import _Trainer

    out = tmp_path / "run"
    original = _Trainer.train_step

    def twice(self, model):
        logged = original(self, model)
        if self.step == 5:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return logged

    monkeypatch.setattr(_Trainer, "train_step", twice)
    flags = ["--out", str(out), "--steps", "8", "checkpoint_every=2", *SMALL, "--batch-size", "64"]
    assert run_cli("train", *flags) == 130
    err = capsys.readouterr().err
    assert err == (
        f"iresnet train: stopped at once at step 5; the last checkpoint, {out / 'checkpoint.pt'}, is intact "
        f"(step 4). Continue with: iresnet train --out {out} --resume\n"
    )
    monkeypatch.undo()
    assert run_cli("train", "--out", str(out), "--resume") == 0
    assert [r["step"] for r in records(out)] == list(range(1, 9))


def read_until(process: subprocess.Popen, text: str) -> None:
    """Read the run's standard output up to a line holding ``text``."""
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f"the run ended before printing {text!r}: {process.communicate()}")


def deliver_together(process: subprocess.Popen, *signals: signal.Signals) -> None:
    """Send ``signals`` while the process is stopped, then let it go on: it meets them all at
    once, as a person pressing Ctrl-C twice in a second would (Python runs the handlers in the
    order of the signal numbers: SIGINT, then SIGTERM)."""
    process.send_signal(signal.SIGSTOP)
    wait_until(lambda: Path(f"/proc/{process.pid}/stat").read_text().split(")")[-1].split()[0] == "T", process)
    for each in signals:
        process.send_signal(each)
    process.send_signal(signal.SIGCONT)


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
PICTURES = ["--steps", "2", "--no-progress", "eval_size=500"]  # the toy preset's model: pictures take a second
FINISHING = "writing the evaluation weights and the pictures"


@needs_proc
def test_a_second_signal_while_training_stops_at_once(tmp_path: Path) -> None:
    import torch

    out = tmp_path / "run"
    run = start("--out", str(out), *ENDLESS, *SMALL, "checkpoint_seconds=0.2")
    wait_until(lambda: (out / "checkpoint.pt").exists() and logged(out, 3)(), run)
    deliver_together(run, signal.SIGINT, signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert "stop requested: stopping after this step with a checkpoint; press Ctrl-C again" in err
    assert "iresnet train: stopped at once at step " in err and ", is intact (step " in err
    assert "Traceback" not in err
    assert not list(out.glob("*.tmp"))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] >= 1


@needs_proc
@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_final_pictures_lets_them_finish(tmp_path: Path, first: signal.Signals) -> None:
    out = tmp_path / "run"
    run = start("--out", str(out), *PICTURES)
    read_until(run, FINISHING)
    deliver_together(run, first)
    printed, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert "stop requested: finishing the final pictures first (seconds)" in err
    assert "Traceback" not in err and "run written to" in printed
    for name in ("model.safetensors", "curves.png", "density.png", "samples.png"):
        assert (out / name).exists(), name


@needs_proc
def test_a_second_signal_during_the_final_pictures_says_what_is_missing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = start("--out", str(out), *PICTURES)
    wait_until((out / "model.safetensors").exists, run)  # the pictures come next, for about a second
    deliver_together(run, signal.SIGINT, signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert "Traceback" not in err
    message = err.split("iresnet train: ")[1]
    assert message.startswith("stopped at once while writing the final files: training is complete and the last")
    missing = message.split("not written: ")[1].split(". To write them")[0].split(", ")
    final = ("model.safetensors", "curves.png", "density.png", "samples.png")
    assert "samples.png" in missing
    assert [name for name in final if not (out / name).exists()] == missing
    assert not list(out.glob(".*partial*"))
    assert run_cli("train", "--out", str(out), "--resume") == 0
    assert all((out / name).exists() for name in final)


def test_ctrl_c_before_training_starts_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from iresnet.train import engine

    def loading(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the data load, before the handlers are installed

    monkeypatch.setattr(engine, "make_source", loading)
    assert run_cli("train", "--out", str(tmp_path / "run"), "--no-progress") == 130
    assert capsys.readouterr().err == "iresnet train: interrupted\n"
    assert not (tmp_path / "run").exists()


def test_sigterm_before_training_starts_is_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A scheduler's cancel while the data load used to kill the process silently, leaving a run
    directory that a new run there refuses; it is now Ctrl-C: one line, exit 130, no directory."""
    from iresnet.train import engine

    class Unhandled(Exception):
        pass

    def loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM should have stopped the load")

    def unhandled(signum, frame):  # what the test process gets if iresnet installs nothing (not its death)
        raise Unhandled

    monkeypatch.setattr(engine, "make_source", loading)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert run_cli("train", "--out", str(tmp_path / "run"), "--no-progress") == 130
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the handler is put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == "iresnet train: interrupted\n"
    assert not (tmp_path / "run").exists()


def test_a_picture_that_cannot_be_drawn_is_reported_and_the_run_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A diverged model's inverse may fail: the run, its weights and the other pictures stay."""
    from iresnet.core.inverse import InversionError
    from iresnet.report import plots

    def failing(*args, **kwargs):
        raise InversionError("fixed-point inversion (fixed_point) failed for 5 of 2000 samples")

    monkeypatch.setattr(plots, "density_map", failing)
    result = train(config(tmp_path / "run", steps=2), progress=False, finish=write_final_files)
    assert "iresnet: density.png was not drawn: fixed-point inversion" in capsys.readouterr().err
    assert result.step == 2 and not result.interrupted
    assert not (tmp_path / "run/density.png").exists()
    assert {path.name for path in (tmp_path / "run").glob(".*")} == {".lock"}  # no partial picture left
    assert (tmp_path / "run/samples.png").exists() and (tmp_path / "run/model.safetensors").exists()
