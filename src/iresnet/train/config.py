"""The one configuration object of a run: built once from a preset, then a JSON config file,
then command-line overrides, saved with the run and handed down."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.logdet import ESTIMATORS, make_estimator, update_spec
from ..models.options import merge_options
from ..tasks import TASKS, get_task, listed
from .presets import PRESETS

__all__ = ["TrainConfig", "parse_override", "read_settings", "resolve_config", "resume_changes", "upgrade_settings"]

SEED_LIMIT = 2**43
"""A run's seed lies strictly between -SEED_LIMIT and SEED_LIMIT: its data streams' generators
are seeded with ``seed * 1_000_003 + step + stream * 2**40``, which torch takes as a 64-bit integer."""


@dataclass
class TrainConfig:
    r"""Everything a training run depends on.

    ``model`` holds the model builder's options as JSON gives them, read into the builder's
    options class (:mod:`iresnet.models.options`), which checks them, when the model is built;
    the task and the data set decide the builder (:func:`~iresnet.models.toy_flow` for 2-D data,
    :func:`~iresnet.models.image_flow` for images, :func:`~iresnet.models.iresnet_classifier` to
    classify images, :func:`~iresnet.models.hybrid_model` for both at once).

    ``hybrid_lambda`` weighs the density in the hybrid objective
    :math:`\log p(y|x) + \lambda \log p(x) / D`; ``labelled_fraction`` keeps the labels of that
    fraction of the training images (the rest count only through :math:`\log p(x)`);
    ``augment`` crops and flips the training images; the learning rate is multiplied by
    ``lr_gamma`` at each step of ``lr_milestones``; ``optimizer`` "sgd" has momentum 0.9.

    ``compile`` runs the model's forward and backward passes through ``torch.compile`` (a
    first-order graph, see :mod:`iresnet.core.jacobian`; the first steps pay the compilation; the
    optimiser step stays eager). ``precision`` "bf16" runs the
    branches' matrix products and convolutions in bfloat16 autocast on CUDA; the power iteration,
    the log-det sums and the base density stay in float32.

    A checkpoint is written every ``checkpoint_every`` steps and, between them, once
    ``checkpoint_seconds`` have passed since the last (``None``: by steps alone), so that a killed
    run loses at most about that much time.

    ``eval_logdet`` is the log-det estimator of the test evaluations (training's and ``iresnet
    eval``'s): ``"auto"`` takes, for images, the roulette with 20 exact terms and 4 probes
    (:func:`~iresnet.tasks.accurate_estimator`: unbiased, with a small variance) and, for
    2-D data, the model's own (the toy flow's is exact); ``None`` the model's own; otherwise an
    estimator's name or a mapping of its name and options, as ``model.logdet`` takes it.

    ``threads`` is the number of CPU threads torch uses in each process while training
    (``torch.set_num_threads``; ``None`` keeps torch's default, one per core). One thread is as fast
    as two for the toy and digits models, and stays fast beside other busy processes, where
    torch's default slows down several times.
    """

    preset: str = "toy"
    task: str = "density"
    data: str = "8gaussians"
    data_dir: str | None = None
    download: bool = False
    model: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.2
    augment: bool = False
    hybrid_lambda: float = 1.0
    labelled_fraction: float = 1.0
    grad_clip: float | None = None
    ema_decay: float | None = None
    seed: int = 0
    device: str = "auto"  # CUDA when a GPU is available, else the CPU (see train.distributed.resolve_device)
    out: str | None = None  # None: runs/PRESET, runs/PRESET-2, ... (a new one, or the latest to resume)
    checkpoint_every: int = 500
    checkpoint_seconds: float | None = 60.0
    eval_every: int = 500
    log_every: int = 10
    eval_size: int = 20000
    eval_logdet: str | dict[str, Any] | None = "auto"
    tensorboard: bool = False
    compile: bool = False
    precision: str = "float32"
    threads: int | None = 1

    def __post_init__(self) -> None:
        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            check, kind = _TYPE_CHECKS[str(setting.type)]  # the annotation's text: annotations are postponed
            if not check(value):
                raise ValueError(f"{setting.name} must be {kind}, got {value!r}")
        if self.out is not None and not self.out.strip():
            raise ValueError("out must name a run directory, got an empty one (leave it out for runs/PRESET)")
        positive = ("steps", "batch_size", "checkpoint_every", "eval_every", "log_every", "eval_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        task = get_task(self.task)
        if self.precision not in ("float32", "bf16"):
            raise ValueError(f"precision must be 'float32' or 'bf16', got {self.precision!r}")
        if self.optimizer not in ("adam", "adamax", "sgd"):
            raise ValueError(f"optimizer must be 'adam', 'adamax' or 'sgd', got {self.optimizer!r}")
        steps = [0, *self.lr_milestones]
        if any(later <= earlier for earlier, later in zip(steps, steps[1:])):
            raise ValueError(f"lr_milestones must be strictly increasing steps of at least 1, got {self.lr_milestones}")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma must lie in (0, 1], got {self.lr_gamma}")
        if not 0 <= self.hybrid_lambda < math.inf:
            raise ValueError(f"hybrid_lambda must be a finite number >= 0, got {self.hybrid_lambda}")
        if not 0 < self.labelled_fraction <= 1:
            raise ValueError(f"labelled_fraction must lie in (0, 1], got {self.labelled_fraction}")
        if self.labelled_fraction < 1 and not task.labelled:
            users = listed([t.name for t in TASKS.values() if t.labelled])
            raise ValueError(f"labelled_fraction is for the tasks {users}; a {task.title} uses no labels")
        for other in {name for t in TASKS.values() for name in t.settings} - set(task.settings):
            if getattr(self, other) != getattr(TrainConfig, other):
                owners = [t.name for t in TASKS.values() if other in t.settings]
                raise ValueError(
                    f"{other} is for the task{'s' if len(owners) > 1 else ''} {listed(owners)}, not {self.task}"
                )
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be at least 0, got {self.warmup_steps}")
        if not -SEED_LIMIT < self.seed < SEED_LIMIT:  # the data streams' generators take seed * 1_000_003 + ...
            raise ValueError(f"seed must lie strictly between -2**43 and 2**43 ({SEED_LIMIT:,}), got {self.seed}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in (0, 1) or be null, got {self.ema_decay}")
        if self.checkpoint_seconds is not None and not self.checkpoint_seconds > 0:
            raise ValueError(f"checkpoint_seconds must be positive or null, got {self.checkpoint_seconds}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1 or null, got {self.threads}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or null, got {self.grad_clip}")
        if isinstance(self.eval_logdet, str) and self.eval_logdet not in ("auto", *ESTIMATORS):
            raise ValueError(
                f"eval_logdet must be auto, one of {', '.join(ESTIMATORS)}, a mapping of an estimator's name and "
                f"options, or null, got {self.eval_logdet!r}"
            )
        if self.eval_logdet != "auto":
            make_estimator(self.eval_logdet, "eval_logdet")  # raises for an unknown name, option or value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TYPE_CHECKS = {  # a field's annotation: its check and what it asks for
    "int": (_is_integer, "an integer"),
    "int | None": (lambda v: v is None or _is_integer(v), "an integer or null"),
    "float": (_is_number, "a number"),
    "float | None": (lambda v: v is None or _is_number(v), "a number or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "list[int]": (lambda v: isinstance(v, list) and all(map(_is_integer, v)), "a list of integers"),
    "dict[str, Any]": (lambda v: isinstance(v, dict), "a mapping"),
    "str | dict[str, Any] | None": (
        lambda v: v is None or isinstance(v, (str, dict)),
        "auto, an estimator's name, a mapping of its name and options, or null",
    ),
}


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in the JSON file ``path`` (an object of :class:`TrainConfig`'s fields);
    ``ValueError`` naming the file, and the line (and column), where it is not valid JSON, not an
    object, or names an unknown setting, or where it cannot be read (a directory, a missing file)."""
    try:
        raw = Path(path).read_bytes()
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a JSON file of settings") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read it: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not a JSON file (not UTF-8 text: byte {error.start} is {raw[error.start]:#04x})"
        ) from None
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno}, column {error.colno}: not valid JSON: {error.msg}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a JSON object of settings, {{...}}, got a {type(settings).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in settings:
        if key not in known:
            found = re.search(rf'"{re.escape(key)}"\s*:', text)  # the line of its first "key":
            line = "" if found is None else f", line {text.count(chr(10), 0, found.start()) + 1}"
            raise _unknown_setting(key, f"{path}{line}")
    return upgrade_settings(settings, str(path))


_RENAMED_ESTIMATOR_OPTIONS = {"n_samples": "n_probes"}  # old name: new name (n_samples is a Monte Carlo sample size)


def upgrade_settings(settings: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """``settings`` written before an option was renamed, with the new name: ``model.logdet``'s
    ``n_samples`` (Hutchinson probes) is ``n_probes``. A warning names ``source`` (none without)."""
    logdet = settings.get("model", {}).get("logdet") if isinstance(settings.get("model"), dict) else None
    if not isinstance(logdet, dict) or not any(old in logdet for old in _RENAMED_ESTIMATOR_OPTIONS):
        return settings
    renamed = {_RENAMED_ESTIMATOR_OPTIONS.get(key, key): value for key, value in logdet.items()}
    if source is not None:
        old_names = [key for key in logdet if key in _RENAMED_ESTIMATOR_OPTIONS]
        notes = ", ".join(f"model.logdet.{key} as {_RENAMED_ESTIMATOR_OPTIONS[key]}" for key in old_names)
        warnings.warn(f"{source}: read {notes} (renamed)", stacklevel=2)
    return {**settings, "model": {**settings["model"], "logdet": renamed}}


def _unknown_setting(key: str, where: str) -> ValueError:
    known = sorted(f.name for f in dataclasses.fields(TrainConfig))
    return ValueError(f"{where}: unknown setting {key!r}; known settings: {', '.join(known)}")


def _merge(base: dict[str, Any], update: dict[str, Any], source: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if key not in known:
            raise _unknown_setting(key, source)
        if key == "model":
            if not isinstance(value, dict):
                raise ValueError(f"{source}: 'model' must be a mapping of model options, got {value!r}")
            merged["model"] = merge_options(merged.get("model", {}), value)
        elif key == "eval_logdet":
            merged[key] = _merge_estimator(merged.get(key, "auto"), value, source)
        else:
            merged[key] = value
    return merged


def _merge_estimator(base: Any, update: Any, source: str) -> Any:
    """``eval_logdet`` updated as ``model.logdet`` is (:func:`~iresnet.core.logdet.update_spec`);
    options without a name need an estimator to belong to, which ``"auto"`` and null are not."""
    if isinstance(update, dict) and "name" not in update and (base == "auto" or base is None):
        raise ValueError(
            f"{source}: eval_logdet is {base!r}, whose estimator has no options to change: give its name too, "
            f'e.g. eval_logdet={{"name": "roulette", ...}}'
        )
    return update_spec(base, update)


def parse_override(text: str) -> dict[str, Any]:
    """``"key=value"`` (``"model.key=value"`` for a model option, ``"model.logdet.key=value"`` for
    one of its estimator's) as a nested mapping; the value is read as JSON where it parses
    (numbers, true/false/null, lists, objects), else as a string."""
    key, sep, raw = text.partition("=")
    path = key.split(".")
    if not sep or not all(path):
        raise ValueError(f"an override must look like key=value or model.key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    for name in reversed(path):
        value = {name: value}
    return value


def resolve_config(
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[dict[str, Any]] = (),
    *,
    saved: TrainConfig | None = None,
) -> TrainConfig:
    """The preset's settings, updated by the JSON ``config_file``, updated by ``overrides`` in
    order (later wins). ``preset=None`` takes the config file's preset, else ``"toy"``. Model
    options merge one by one (:func:`~iresnet.models.options.merge_options`), and so do the
    options of a log-det estimator (``model.logdet``, ``eval_logdet``) while its name stays the
    same: ``model.logdet.n_exact_terms=5`` on the ``cifar10-paper`` preset keeps its Poisson
    tail and ``memory_efficient``; a new name drops the old estimator's options. Where the
    task or data set call for another model builder than the preset's (``--task classify`` from
    the toy preset, say), the preset's model options are dropped: the builder's defaults apply.
    A builder that extends the preset's (``--task hybrid`` from the digits preset: the image
    flow's options, and the classifier) keeps them, and drops those it does not take.

    To resume a run, ``saved`` (its ``config.json``) takes the preset's place: the run goes on as
    it was configured, changed only by ``config_file`` and ``overrides``; ``preset``, if given,
    must be the run's."""
    from_file = {} if config_file is None else read_settings(config_file)
    named = [override["preset"] for override in overrides if "preset" in override]  # preset=NAME
    if preset is not None and any(other != preset for other in named):
        raise ValueError(f"--preset {preset} and preset={named[-1]} disagree: give the preset once")
    preset = preset or (named[-1] if named else None)
    if saved is not None:
        asked = preset or from_file.get("preset")
        if asked is not None and asked != saved.preset:
            raise ValueError(
                f"{saved.out} is a run of the {saved.preset!r} preset, not {asked!r}: resume it without naming "
                "another preset (--preset, preset=NAME, or a config file's preset)"
            )
        settings = _merge(saved.to_dict(), from_file, str(config_file))
        for override in overrides:
            settings = _merge(settings, override, "command line")
        return TrainConfig(**settings)
    name = preset or from_file.get("preset") or "toy"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    preset_settings = _merge({"preset": name}, PRESETS[name], f"preset {name!r}")
    settings = _merge(preset_settings, from_file, str(config_file))
    settings["preset"] = name
    for override in overrides:
        settings = _merge(settings, override, "command line")
    config = TrainConfig(**settings)
    explicit: dict[str, Any] = functools.reduce(
        merge_options, (update.get("model", {}) for update in (from_file, *overrides)), {}
    )
    takes = _options(config.task, config.data)
    preset_takes = _options(
        preset_settings.get("task", TrainConfig.task), preset_settings.get("data", TrainConfig.data)
    )
    if not (takes.items() <= preset_takes.items() or preset_takes.items() <= takes.items()):
        model = explicit  # the preset's model options belong to another builder
    else:  # the same builder, or one that extends it (a hybrid's: the image flow's and its classifier)
        model = {k: v for k, v in config.model.items() if k in takes or k in explicit}
    return dataclasses.replace(config, model=model)


def resume_changes(saved: dict[str, Any], config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """What resuming the run saved with the settings ``saved`` as ``config`` changes: the settings
    (but ``out``) with their old and new values. A resumed run may change how long it trains, its
    learning rate and clipping (the advice after a non-finite loss), how it logs and how its step
    is computed (the model's solver options among them), not what it trains (``ValueError``
    naming each such change). A setting that ``saved`` lacks (it came later) had its default value."""
    free = {"steps", "out", "checkpoint_every", "checkpoint_seconds", "eval_every", "log_every", "tensorboard"}
    free |= {"device", "download", "lr", "grad_clip"}
    free |= {"compile", "precision", "threads"}  # how the same step is computed
    free |= {"eval_logdet"}  # how the test evaluations estimate, not what is trained
    saved = {**TrainConfig(out=config.out).to_dict(), **saved}
    new = config.to_dict()
    changed = [k for k, v in new.items() if k not in free and _trained(k, saved.get(k)) != _trained(k, v)]
    if changed:
        raise ValueError(
            "cannot resume with different settings for "
            + ", ".join(f"{k} ({saved.get(k)!r} -> {getattr(config, k)!r})" for k in changed)
        )
    return {k: (saved.get(k), v) for k, v in new.items() if k != "out" and saved.get(k) != v}


_SOLVER_OPTIONS = ("inverse_method", "atol", "rtol", "max_iter")
"""The model options that say how a block's fixed points are solved, not what is trained: a
resumed run may change them (the advice after a solve that did not converge)."""


def _trained(key: str, value: Any) -> Any:
    """A setting as far as it decides what is trained: the model options without the solver's."""
    if key == "model" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in _SOLVER_OPTIONS}
    return value


def _options(task: str, data: str) -> dict[str, Any]:
    """The model options of the builder that ``task`` calls for on ``data``."""
    from ..models.build import model_options

    return model_options(get_task(task).builder(data))
