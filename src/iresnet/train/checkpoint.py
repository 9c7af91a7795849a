"""Run directories: the resolved config (``config.json``), the full training state
(``checkpoint.pt``, written atomically), the evaluation weights alone (``model.safetensors``)
and ``metrics.jsonl``. A checkpoint holds state dicts and plain values, never a pickled model:
the model is rebuilt from the config."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..tasks import get_task
from .config import TrainConfig, read_settings
from .distributed import Processes, resolve_device

__all__ = [
    "RunDirectoryError",
    "RunFiles",
    "RunInUseError",
    "WriteError",
    "atomic_save",
    "claimed_run",
    "default_run_directory",
    "load_config",
    "load_run",
    "read_checkpoint",
    "remove_leftovers",
    "resumed_config",
    "run_lock",
    "save_weights",
    "starting_state",
    "truncate_metrics",
]


class RunFiles:
    """The paths of one run directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.checkpoint = self.root / "checkpoint.pt"
        self.weights = self.root / "model.safetensors"
        self.metrics = self.root / "metrics.jsonl"


def default_run_directory(preset: str, resume: bool, root: str | os.PathLike = "runs") -> Path:
    """``runs/PRESET``, ``runs/PRESET-2``, ``-3``, ...: for a new run the one after the highest
    number there, created here (by ``mkdir``, which fails for all but one of several processes
    that try the same name at once: the others take the next), so that no run overwrites another
    and the numbers follow the order the runs started in, gaps left by removed runs included; to
    ``resume``, the highest number there, the latest run (or ``runs/PRESET`` where none is)."""

    def path(index: int) -> Path:
        return Path(root) / (preset if index == 1 else f"{preset}-{index}")

    numbered = re.compile(rf"{re.escape(preset)}(?:-([0-9]+))?")
    matches = [numbered.fullmatch(entry.name) for entry in Path(root).iterdir()] if Path(root).is_dir() else []
    highest = max((int(match.group(1) or 1) for match in matches if match is not None), default=0)
    if resume:
        return path(max(highest, 1))
    index = highest + 1
    while True:
        try:
            path(index).mkdir(parents=True)
            return path(index)
        except FileExistsError:
            index += 1


class RunInUseError(RuntimeError):
    """Another process is training in this run directory."""


class RunDirectoryError(OSError):
    """The run directory cannot be made or locked (a path under a file, a place not writable)."""


@contextmanager
def run_lock(root: str | os.PathLike) -> Iterator[None]:
    """Hold ``ROOT/.lock`` exclusively (``flock``, without waiting) while the block runs: a second
    process that trains in the same directory gets :class:`RunInUseError` instead of mixing its
    records and checkpoints with the first's. The operating system releases the lock when the
    process ends, however it ends. (Where ``fcntl`` is missing, on Windows, nothing is locked.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(root) / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise RunInUseError(
                f"{root} is being trained by another process (pid {holder}): wait for it to end, or stop it, "
                "or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def claimed_run(config: TrainConfig, procs: Processes, resume: bool) -> Iterator[TrainConfig]:
    """``config`` with its run directory (``out``; where it is ``None``, the main process's choice
    of :func:`default_run_directory`), created if missing and locked by the main process while the
    context lasts (:class:`RunInUseError` on every process where another run holds it), the
    leftovers of a write cut short removed. A directory this call created is removed again if the
    context fails before anything was written into it."""
    created = False
    out = config.out
    if out is None:  # every process takes the main process's choice, or its refusal
        chosen: Path | None = None
        refused: Exception | None = None
        if procs.main:
            try:
                chosen = default_run_directory(config.preset, resume)
            except OSError as error:  # runs a file, say
                refused = _cannot_make(Path("runs") / config.preset, error)
        chosen, refused = procs.gather((chosen, refused))[0]
        if refused is not None:
            raise refused
        out = str(chosen)
        config = dataclasses.replace(config, out=out)
        created = not resume
    root = Path(out)
    with contextlib.ExitStack() as held:
        refused = None  # the main process's refusal, raised on every process
        if procs.main:
            try:
                try:
                    root.mkdir(parents=True)
                    created = True
                except FileExistsError:
                    if not resume:
                        _refuse_foreign_files(root)
                held.enter_context(run_lock(root))
            except (RunInUseError, FileExistsError) as error:
                refused = error
            except OSError as error:
                refused = _cannot_make(root, error)
        refused = procs.gather(refused)[0]
        if refused is not None:
            raise refused
        if procs.main and (removed := remove_leftovers(RunFiles(root))):
            print(f"removed {', '.join(removed)} in {root}, left by a write that was cut short")
        try:
            yield config
        except BaseException:
            if created and procs.main:
                _remove_if_empty(root)
            raise


def _cannot_make(root: Path, error: OSError) -> RunDirectoryError:
    """The refusal of a run directory that cannot be made or locked, with the system's reason."""
    return RunDirectoryError(f"cannot make the run directory {root}: {error.strerror or error}; choose another --out")


def _refuse_foreign_files(root: Path) -> None:
    """``FileExistsError`` where a new run's directory is not empty and holds no run's
    ``config.json``: the run would write its own files among the files there, over any of the same
    name (``samples.png``, say). A run's directory is refused later, with what to do
    (:func:`starting_state`)."""
    if root.is_file():
        raise FileExistsError(f"{root} is a file, not a directory: choose another --out")
    if not root.is_dir():  # a dangling link, say: making the lock in it fails with its own message
        return
    leftovers = (".lock", ".tmp", ".partial.png")  # the lock, and what remove_leftovers removes
    names = sorted(entry.name for entry in root.iterdir() if not entry.name.endswith(leftovers))
    if not names or RunFiles(root).config.name in names:
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise FileExistsError(
        f"{root} is not empty and holds no run ({shown}): a new run there would write its files among these, "
        "over any of the same name. Choose another --out, a new or an empty directory"
    )


def _remove_if_empty(root: Path) -> None:
    """Remove a run directory that holds nothing but its lock."""
    with contextlib.suppress(OSError):  # never in the way of the error that ended the run
        if {p.name for p in root.iterdir()} <= {".lock"}:
            (root / ".lock").unlink(missing_ok=True)
            root.rmdir()


def remove_leftovers(files: RunFiles) -> list[str]:
    """Remove what a write cut short by a kill left in a run directory: the temporary files of
    the atomic writes and the pictures' partial files. Call it holding the directory's lock."""
    names = (files.checkpoint, files.weights, files.config, files.metrics)
    leftovers = [p for p in (path.with_name(path.name + ".tmp") for path in names) if p.exists()]
    leftovers += files.root.glob(".*.partial.png")
    for path in leftovers:
        path.unlink(missing_ok=True)
    return [path.name for path in leftovers]


def _first_sentence(error: BaseException) -> str:
    """The start of an error's message (torch's run over several lines), or its type."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else type(error).__name__


class WriteError(OSError):
    """A file of the run could not be written, most often because the disk is full."""


def write_error(path: Path, error: BaseException, kept: str) -> WriteError:
    """A :class:`WriteError` naming ``path`` and saying what ``kept`` as it was."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else _first_sentence(error)
    failure = WriteError(f"could not write {path} ({reason}): the disk may be full. {kept}")
    failure.errno = getattr(error, "errno", None)
    return failure


def _replace_atomically(path: Path, write) -> None:
    """``write(tmp)``, then rename the temporary file onto ``path``: the old file stays until the
    new one is complete and on disk. On any failure the temporary file is removed; a failure to
    write (``torch.save`` reports a short write as a ``RuntimeError``) becomes a
    :class:`WriteError`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # a full disk may show only here
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)):
            kept = f"The previous {path.name} is intact" if path.exists() else f"No {path.name} was written"
            raise write_error(path, error, f"{kept}, and the partial {tmp.name} was removed.") from error
        raise


def atomic_save(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then rename: a crash leaves the old file intact."""
    _replace_atomically(Path(path), lambda tmp: torch.save(state, tmp))


_CHECKPOINT_KEYS = {"step", "model", "optimizer", "scheduler", "ema", "rng", "config"}


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state in ``path``; a file that cannot be read, or that does not hold a
    training state, raises ``ValueError`` naming it."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        reason = _first_sentence(error)
        raise ValueError(
            f"{path} cannot be read ({reason}): it is damaged. The run cannot continue from it: put back a copy "
            "of the file if you have one, or start a new run (another --out). If the run had finished, its "
            "model.safetensors still serves iresnet eval and sample"
        ) from error
    missing = _CHECKPOINT_KEYS - set(state) if isinstance(state, dict) else _CHECKPOINT_KEYS
    if missing:
        raise ValueError(f"{path} is not a training checkpoint of iresnet: it lacks {', '.join(sorted(missing))}")
    return state


def save_weights(model: nn.Module, path: str | os.PathLike, step: int | None = None) -> None:
    """The model's state dict (parameters and buffers) as safetensors, atomically, with the
    mode of any new file (0644 under the usual umask 022); the training ``step`` they belong to,
    where given, in the file's metadata (:func:`load_run` compares it with the checkpoint's)."""
    from safetensors.torch import save

    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}
    metadata = None if step is None else {"step": str(step)}
    # not safetensors' save_file: it writes through a private temporary file, mode 0600
    _replace_atomically(Path(path), lambda tmp: tmp.write_bytes(save(tensors, metadata=metadata)))


def save_text(text: str, path: str | os.PathLike) -> None:
    """``text`` into ``path``, atomically."""
    _replace_atomically(Path(path), lambda tmp: tmp.write_text(text))


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    save_text(json.dumps(config.to_dict(), indent=2) + "\n", path)


def load_config(run: str | os.PathLike) -> TrainConfig:
    """The settings a run was trained with, from its ``config.json``; ``ValueError`` naming the
    file (and the line) where it is not JSON, holds an unknown setting or a bad value."""
    files = RunFiles(run)
    if not files.config.exists():
        raise FileNotFoundError(f"{files.root} is not a run directory: {files.config.name} is missing")
    settings = read_settings(files.config)
    try:
        return TrainConfig(**settings)
    except ValueError as error:
        raise ValueError(f"{files.config}: {error}") from None


def starting_state(files: RunFiles, resume: bool, device: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The training state in the checkpoint of ``files`` to ``resume`` from, or ``None`` for a new
    run. Refused, each with what to do: a resume with no checkpoint, a new run over a checkpoint,
    and a new run over the records of one that stopped before its first checkpoint."""
    if not files.checkpoint.exists():
        logged = files.metrics.exists() and files.metrics.read_text().strip()
        if resume:
            early = " (its run stopped before its first checkpoint)" if logged else ""
            if files.weights.exists():  # a finished run's: its checkpoint was removed
                raise FileNotFoundError(
                    f"nothing to resume: the checkpoint {files.checkpoint} is missing ({files.weights.name} holds "
                    "the final weights, not the training state to go on from)"
                )
            raise FileNotFoundError(f"nothing to resume: {files.checkpoint} does not exist{early}")
        if logged:
            raise FileExistsError(
                f"{files.root} holds {files.metrics.name} of an earlier run that stopped before its first "
                "checkpoint: it cannot be resumed, and a new run there would add its records to the old ones. "
                f"Choose another --out, or remove {files.root} (or move its metrics.jsonl away) to start again there"
            )
        return None
    state = read_checkpoint(files.checkpoint, device)
    if not resume:
        raise FileExistsError(
            f"{files.root} already holds a run (checkpoint at step {state['step']}): pass --resume to continue it, "
            "or --out for a new run directory"
        )
    return state


def resumed_config(out: str | os.PathLike | None, preset: str | None) -> TrainConfig:
    """The settings of the run to resume: ``out``'s, or, where ``out`` is ``None``, those of the
    latest run of ``preset`` (default ``toy``), with ``out`` set to its directory."""
    run = out if out is not None else default_run_directory(preset or "toy", resume=True)
    return dataclasses.replace(load_config(run), out=str(run))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records of steps after the checkpoint (written before a crash), so a resumed run
    does not log them twice, and a last line written only in part (a warning says so)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record["step"] <= step:
                kept.append(line)
        except (ValueError, TypeError, KeyError):
            if number < len(lines):
                raise ValueError(
                    f"{path}, line {number}, is not a record of the run ({line[:60]!r}): repair or remove that line, "
                    "then resume again"
                ) from None
            warnings.warn(f"{path}: dropped its last line, written only in part ({line[:60]!r})", stacklevel=2)
    save_text("".join(line + "\n" for line in kept), path)


def load_run(run: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The trained model of a run directory (its evaluation weights, from ``model.safetensors``,
    or else from the last checkpoint), in eval mode on ``device`` (``"auto"`` too, see
    :func:`~iresnet.train.distributed.resolve_device`), with its config.

    A checkpoint of a later step than ``model.safetensors`` (a resumed run, stopped or still
    training) comes first, with a warning that names both steps. A ``model.safetensors`` that
    cannot be read, or whose tensors do not fit the model that ``config.json`` describes, is
    passed over for the checkpoint with a warning naming it; where neither file gives the
    weights, ``ValueError`` names both and what is wrong with each."""
    files, config = RunFiles(run), load_config(run)
    model = get_task(config.task).build_model(config.data, config.model)
    readers = [(files.weights, _safetensors_weights), (files.checkpoint, _checkpoint_weights)]
    steps = _steps_of(files)
    if steps is not None and steps[1] > steps[0]:
        readers.reverse()
        warnings.warn(
            f"{files.checkpoint} holds step {steps[1]}, later than {files.weights} (step {steps[0]}): the run was "
            f"resumed and has not finished (or is training now), so the weights of step {steps[1]} are used. To "
            f"finish a stopped run: iresnet train --out {files.root} --resume",
            stacklevel=2,
        )
    problems = []
    for path, read in readers:
        if not path.exists():
            continue
        try:
            _load_into(model, read(path))
        except ValueError as error:
            problems.append(f"{path} {error}")
            continue
        if problems:
            warnings.warn(f"{problems[0]}; the weights come from {path} instead", stacklevel=2)
        return model.to(resolve_device(device)).eval(), config
    if not problems:
        raise FileNotFoundError(f"{files.root} holds neither {files.weights.name} nor {files.checkpoint.name}")
    raise ValueError(f"no usable weights in {files.root}: " + "; ".join(problems))


def _steps_of(files: RunFiles) -> tuple[int, int] | None:
    """The training steps of ``model.safetensors`` (from its metadata) and of the checkpoint, or
    ``None`` where either is missing, unreadable or (weights written before the step was kept)
    unknown: the readers of :func:`load_run` say what is wrong with a damaged file."""
    from safetensors import SafetensorError, safe_open

    if not (files.weights.exists() and files.checkpoint.exists()):
        return None
    try:
        with safe_open(str(files.weights), "pt") as weights:
            weights_step = int((weights.metadata() or {})["step"])
        checkpoint = torch.load(files.checkpoint, map_location="cpu", weights_only=True, mmap=True)
        return weights_step, int(checkpoint["step"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError, pickle.UnpicklingError, EOFError):
        return None


def _safetensors_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot be read as safetensors ({error})") from error


def _checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors in a checkpoint, its EMA's in place of the parameters it averages."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as error:
        # torch's own message for a damaged file suggests weights_only=False: not for a file we cannot trust
        raise ValueError(f"cannot be read as a PyTorch checkpoint ({type(error).__name__})") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise ValueError("holds no model state")
    return {**checkpoint["model"], **(checkpoint.get("ema") or {}).get("shadow", {})}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)``, or ``ValueError`` saying how ``state`` does not fit. A
    failed load may leave some tensors replaced: the next file's strict load replaces them all."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    differences = [
        f"{len(names)} {what} (first {names[0]})"
        for what, names in (("missing", missing), ("not in the model", unexpected))
        if names
    ]
    if differences:
        raise ValueError(f"does not fit the model config.json describes: tensors {', '.join(differences)}")
    try:  # shapes are load_state_dict's to judge: a convolution's power-iteration vectors take any
        model.load_state_dict(state)
    except RuntimeError as error:
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise ValueError(f"does not fit the model config.json describes: {details[0] if details else error}") from error
