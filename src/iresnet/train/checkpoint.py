"""Run directories: the resolved config (``config.json``), the full training state
(``checkpoint.pt``, written atomically), the evaluation weights alone (``model.safetensors``)
and ``metrics.jsonl``. A checkpoint holds state dicts and plain values, never a pickled model:
the model is rebuilt from the config."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.build import build_model
from .config import TrainConfig, read_settings
from .distributed import resolve_device

__all__ = ["RunFiles", "atomic_save", "save_weights", "load_run", "default_run_directory"]


class RunFiles:
    """The paths of one run directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.checkpoint = self.root / "checkpoint.pt"
        self.weights = self.root / "model.safetensors"
        self.metrics = self.root / "metrics.jsonl"


def default_run_directory(preset: str, resume: bool, root: str | os.PathLike = "runs") -> Path:
    """``runs/PRESET``, ``runs/PRESET-2``, ``-3``, ...: the first that does not exist for a new run,
    the one before it to ``resume``, so that no run overwrites another."""
    previous, index = None, 1
    while True:
        path = Path(root) / (preset if index == 1 else f"{preset}-{index}")
        if not path.exists():
            return previous if resume and previous is not None else path
        previous, index = path, index + 1


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_save(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then rename: a crash leaves the old file intact."""
    _replace_atomically(Path(path), lambda tmp: torch.save(state, tmp))


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """The model's state dict (parameters and buffers) as safetensors, atomically, with the
    mode of any new file (0644 under the usual umask 022)."""
    from safetensors.torch import save

    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}
    # not safetensors' save_file: it writes through a private temporary file, mode 0600
    _replace_atomically(Path(path), lambda tmp: tmp.write_bytes(save(tensors)))


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    _replace_atomically(Path(path), lambda tmp: tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n"))


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


def load_run(run: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The trained model of a run directory (its evaluation weights, from ``model.safetensors``,
    or else from the last checkpoint), in eval mode on ``device`` (``"auto"`` too, see
    :func:`~iresnet.train.distributed.resolve_device`), with its config.

    A ``model.safetensors`` that cannot be read, or whose tensors do not fit the model that
    ``config.json`` describes, is passed over for the checkpoint with a warning naming it; where
    neither file gives the weights, ``ValueError`` names both and what is wrong with each."""
    files, config = RunFiles(run), load_config(run)
    model = build_model(config.task, config.data, config.model)
    problems = []
    for path, read in ((files.weights, _safetensors_weights), (files.checkpoint, _checkpoint_weights)):
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
