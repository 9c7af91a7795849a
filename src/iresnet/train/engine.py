"""The training loop: a run directory with its config, metrics, atomic checkpoints, exact
resumption, a clean stop on Ctrl-C, a loud stop on a non-finite loss, warm-up, clipping, an
EMA for evaluation, and ``torchrun`` data parallelism. What is trained, and how it is scored,
is the task's (:mod:`iresnet.tasks`); the pictures of a finished run are its caller's
(``train(..., finish=...)``)."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..core.compiled import memory_lean
from ..core.inverse import MAX_ITER, InversionError
from ..core.layers import initialize_from_data
from ..core.lipschitz import converge_spectral_norms
from ..core.validation import reports_non_finite_input
from ..data.preprocess import bits_per_dim
from ..tasks import Evaluated, Task, evaluation_randomness, get_task
from .checkpoint import (
    RunFiles,
    atomic_save,
    claimed_run,
    save_config,
    save_weights,
    starting_state,
    truncate_metrics,
    write_error,
)
from .config import TrainConfig, resume_changes, upgrade_settings
from .distributed import Processes, start_processes
from .ema import ExponentialMovingAverage
from .optim import optimizer, set_lr
from .sources import DataSource, make_source
from .stopping import StoppedAtOnce, StopRequests

__all__ = ["FinishedRun", "StoppedAtOnce", "TrainingError", "TrainResult", "train"]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the last checkpoint is intact."""


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is torch's failure to allocate memory, on a GPU or on the CPU."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def allocation(error: BaseException) -> str:
    """The allocation that failed, in words, from torch's message (CPU: bytes; CUDA: its unit)."""
    text = str(error)
    found = re.search(r"allocate (\d+) bytes", text) or re.search(r"[Tt]ried to allocate ([\d.]+ \w+)", text)
    if found is None:
        return "an allocation failed"
    size = f"{int(found[1]):,} bytes" if found[1].isdigit() else found[1]
    return f"an allocation of {size} failed"


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    interrupted: bool
    evaluation: Evaluated | None  # the last test evaluation (the task's)
    main: bool = True  # whether this is the process that writes (rank 0)


@dataclass
class FinishedRun:
    """A run whose training is complete, as the main process hands it to the final step that
    :func:`train`'s caller gives (``finish``): the evaluation model (the EMA weights where kept,
    eval mode), its data, files and task, and ``unwritten``, the final files not written yet, which
    a second Ctrl-C names (a final step adds its own, and removes each once written)."""

    model: nn.Module
    source: DataSource
    files: RunFiles
    task: Task
    unwritten: list[str]
    step: int  # the last training step

    def save_weights(self) -> None:
        """``model.safetensors``: the model with its spectral norms converged and calibrated as
        the task asks (the classifier's BatchNorm statistics); the final step of a run without one."""
        converge_spectral_norms(self.model)
        self.task.calibrate(self.model, self.source)
        save_weights(self.model, self.files.weights, self.step)
        self.unwritten.remove(self.files.weights.name)


class _Trainer:
    def __init__(self, config: TrainConfig, procs: Processes, progress: bool) -> None:
        if config.out is None:
            raise ValueError("a run trains into a directory: config.out is None (claimed_run chooses one)")
        self.config, self.procs, self.progress = config, procs, progress
        self.files = RunFiles(config.out)
        self.task = get_task(config.task)
        torch.manual_seed(config.seed + procs.rank)
        self.source: DataSource = make_source(
            config.data,
            config.seed,
            config.eval_size,
            config.data_dir,
            config.download,
            augment=config.augment,
            labelled_fraction=config.labelled_fraction,
        )
        self.task.check(self.source, config)
        if config.precision == "bf16" and procs.device.type != "cuda":
            raise ValueError(
                f"precision=bf16 runs on CUDA only (bfloat16 autocast of the branches), and this run is on "
                f"{procs.device}: use precision=float32, or device=cuda on a machine with a GPU"
            )
        try:
            self.model: nn.Module = self.task.build_model(config.data, config.model).to(procs.device)
        except RuntimeError as error:
            if not out_of_memory(error):
                raise
            raise ValueError(
                f"the model does not fit in memory on {procs.device}: {allocation(error)} while it was built with "
                f"the model options {config.model}; choose smaller model settings (model.hidden, model.blocks, ...)"
            ) from None
        self.optimizer, self.scheduler = optimizer(config, self.model)
        self.ema = ExponentialMovingAverage(self.model, config.ema_decay) if config.ema_decay else None
        self.step = 0
        self.changed: dict[str, tuple[Any, Any]] = {}  # settings a resume changes: old and new values
        self.saved_step: int | None = None  # the step of the last checkpoint written or read
        self.pending: list[dict[str, float]] = []  # what the steps since the last train record logged
        self.pending_seconds = 0.0  # their time, from a checkpoint
        self.logged_at = time.perf_counter()  # when the last train record was written
        self.saved_at = time.monotonic()  # when the last checkpoint was written (or the loop began)
        self.evaluation: Evaluated | None = None
        self.evaluation_due = False  # a checkpoint written when the evaluation of its step failed
        self.writer = None
        self.unwritten: list[str] = []  # the final files not written yet

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.procs.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.procs.device)
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "rng": self.procs.gather(rng),
            "config": self.config.to_dict(),
            # the next train record averages over these steps too, resumed or not
            "pending": {"steps": list(self.pending), "seconds": time.perf_counter() - self.logged_at},
            "evaluation_due": self.evaluation_due,
        }

    def save_checkpoint(self) -> None:
        state = self.state()  # collective under torch.distributed: every process takes part
        if self.procs.main:
            atomic_save(state, self.files.checkpoint)
        self.saved_step, self.saved_at = self.step, time.monotonic()

    def checkpoint_due(self) -> bool:
        """Whether the step count, or the time since the last checkpoint, calls for one now (the
        same answer on every process)."""
        config = self.config
        if self.step % config.checkpoint_every == 0 or self.step == config.steps:
            return True
        if config.checkpoint_seconds is None:
            return False
        return self.procs.any(time.monotonic() - self.saved_at >= config.checkpoint_seconds)

    def restore(self, resume: bool) -> None:
        """The state of the checkpoint to ``resume`` from; nothing for a new run."""
        state = starting_state(self.files, resume, self.procs.device)
        if state is None:
            return
        self.changed = resume_changes(upgrade_settings(state["config"]), self.config)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        rng = state["rng"][self.procs.rank] if len(state["rng"]) == self.procs.world else None
        if rng is None:
            warnings.warn(
                f"the checkpoint was written by {len(state['rng'])} processes and {self.procs.world} resume it: "
                "the random states are not restored, so the run continues, but not as the uninterrupted one would",
                stacklevel=2,
            )
        else:
            torch.set_rng_state(rng["torch"].cpu())
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"].cpu(), self.procs.device)
        self.step = self.saved_step = state["step"]
        if state["config"].get("lr") != self.config.lr:
            set_lr(self.optimizer, self.scheduler, self.config, self.step)
        pending = state.get("pending", {"steps": [], "seconds": 0.0})  # older checkpoints: none
        self.pending, self.pending_seconds = list(pending["steps"]), pending["seconds"]
        self.evaluation_due = bool(state.get("evaluation_due", False))
        if self.procs.main:
            truncate_metrics(self.files.metrics, self.step)

    # -- records -----------------------------------------------------------------------------
    def record(self, entry: dict[str, Any]) -> None:
        if not self.procs.main:
            return
        try:
            with open(self.files.metrics, "a") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError as error:
            kept = self.kept()
            kept = f"{kept[0].upper()}{kept[1:]}: free some space, then continue with --resume."
            raise write_error(self.files.metrics, error, kept) from error
        if self.writer is not None:
            for key, value in entry.items():
                if isinstance(value, float):
                    self.writer.add_scalar(f"{entry['split']}/{key}", value, entry["step"])

    def eval_model(self) -> nn.Module:
        """A copy of the model with the EMA weights (if any) for evaluation."""
        model = copy.deepcopy(self.model)
        if self.ema is not None:
            self.ema.copy_to(model)
        return model.eval()

    def run_evaluation(self) -> Evaluated:
        with evaluation_randomness(self.procs.device):
            config = self.config
            return self.task.evaluate(
                self.eval_model(), self.source, size=config.eval_size, eval_logdet=config.eval_logdet
            )

    def evaluate_and_record(self, bar: Any) -> None:
        """The main process's evaluation at this step, recorded and shown under the progress
        ``bar``; every process calls it. Where the evaluation raises (a bug), every process saves
        the training so far together (a checkpoint is collective under torch.distributed), marked
        so that a resumed run evaluates that step first; then the main process raises the error,
        which says so, and the others a :class:`TrainingError` that points to it."""
        evaluation, failure = None, None
        if self.procs.main:
            try:
                evaluation = self.run_evaluation()
            except Exception as error:
                failure = error
        if self.procs.any(failure is not None):
            self.evaluation_due = True
            self.save_checkpoint()
            saved = (
                f"the training up to it is saved in {self.files.checkpoint}: iresnet train --out {self.files.root} "
                "--resume evaluates that step, then goes on"
            )
            if failure is None:
                raise TrainingError(f"the evaluation at step {self.step} failed in the main process (rank 0); {saved}")
            note = f"iresnet: the evaluation at step {self.step} failed; {saved}"
            add_note = getattr(failure, "add_note", None)  # Python 3.11: shown with the traceback
            if add_note is not None:
                add_note(note)
            else:
                print(note, file=sys.stderr)
            raise failure
        self.evaluation_due = False
        if evaluation is not None:  # the main process
            self.evaluation = evaluation
            self.record({"step": self.step, "split": "test", **evaluation.metrics()})
            bar.write(f"step {self.step}: {evaluation}")

    # -- the loop ------------------------------------------------------------------------------
    def step_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This step's inputs on the device and their labels (``None`` for a task without)."""
        procs = self.procs
        x, y = self.task.batch(self.source, self.step, self.config, procs.rank, procs.world)
        return x.to(procs.device), None if y is None else y.to(procs.device)

    def objective(self, model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This step's loss and what to log: the task's objective on :meth:`step_batch`."""
        x, y = self.step_batch()
        return self.task.objective(model, x, y, self.config)

    def train_step(self, model: nn.Module) -> dict[str, float]:
        config = self.config
        bf16 = config.precision == "bf16"
        lean = memory_lean() if config.compile else contextlib.nullcontext()
        try:
            with lean, torch.autocast(self.procs.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, logged = self.objective(model)
        except InversionError as error:  # a monotone or implicit block solves in every forward pass
            raise TrainingError(self._unsolved(error)) from error
        except (ValueError, RuntimeError) as error:
            if not reports_non_finite_input(error):  # the weights have diverged
                raise
            raise TrainingError(self._failure(f"values inside the model overflowed ({error})")) from error
        reported = {key: self.procs.mean(value).item() for key, value in logged.items()}
        for key in ("cross_entropy", "nll"):
            if key in reported and not math.isfinite(reported[key]):
                raise TrainingError(self._failure(f"the loss is {reported[key]} ({key})"))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = config.grad_clip if config.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        if not math.isfinite(grad_norm):
            raise TrainingError(self._failure(f"the gradient norm is {grad_norm}"))
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return {**reported, "grad_norm": grad_norm}

    def kept(self) -> str:
        """What is left to continue from."""
        if self.saved_step is None:
            return "no checkpoint had been written yet"
        return f"the last checkpoint, {self.files.checkpoint}, is intact (step {self.saved_step})"

    def _failure(self, what: str) -> str:
        """The message of a stop on non-finite values: the step, what was kept, and what to do."""
        lower = f"lr={self.config.lr / 10:g}"
        if self.saved_step is None:
            advice = (
                f"Nothing can be resumed: start again with a lower learning rate (now {self.config.lr:g}) or with "
                f"grad_clip set, in another directory (--out) or after removing {self.files.root}."
            )
        else:
            advice = (
                f"Lower the learning rate (now {self.config.lr:g}) or set grad_clip, and continue from the "
                f"checkpoint, e.g. iresnet train --out {self.files.root} --resume {lower}"
            )
        stopped = f"training stopped at step {self.step + 1}: {what}"
        return f"{stopped}. Nothing was saved from this step; {self.kept()}. {advice}"

    def _unsolved(self, error: InversionError) -> str:
        """The message of a stop on a block's fixed-point solve that did not converge in a forward
        pass: the step, what was kept, and the inverse's settings to raise."""
        more = f"model.max_iter={max(2 * self.config.model.get('max_iter', MAX_ITER), MAX_ITER)}"
        if self.saved_step is None:
            advice = f"Start again with {more}, in another directory (--out) or after removing {self.files.root}."
        else:
            advice = f"Allow more iterations and continue, e.g. iresnet train --out {self.files.root} --resume {more}"
        stopped = f"training stopped at step {self.step + 1}: a block's fixed-point solve did not converge ({error})"
        return f"{stopped}. Nothing was saved from this step; {self.kept()}. {advice}"

    def train_metrics(self, steps: list[dict[str, float]], seconds: float) -> dict[str, Any]:
        """Means over the steps since the last record (the largest gradient norm)."""
        entry: dict[str, Any] = {"step": self.step, "split": "train"}
        for key in steps[0]:
            if key != "grad_norm":
                entry[key] = sum(s[key] for s in steps) / len(steps)
        if "nll" in entry and self.source.is_image:
            entry["bits_per_dim"] = bits_per_dim(torch.tensor(-entry["nll"]), self.source.event_size).item()
        entry.update(
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=max(s["grad_norm"] for s in steps),
            steps_per_s=len(steps) / seconds,
        )
        return entry

    def loop(self, stop: StopRequests) -> bool:
        """Train to ``config.steps``; returns whether a stop was requested first."""
        from tqdm.auto import tqdm

        config = self.config
        model = self.model
        if self.procs.world > 1:
            model = nn.parallel.DistributedDataParallel(self.model)
        bar = tqdm(total=config.steps, initial=self.step, disable=not (self.progress and self.procs.main), unit="step")
        if config.compile:
            initialize_from_data(self.model, self.step_batch()[0])  # no data-dependent branch in the graph
            model = cast(nn.Module, torch.compile(model))  # a module's compiled form is a module (OptimizedModule)
            bar.write("compiling the training step: the first steps take longer (seconds to minutes)")
        self.logged_at = time.perf_counter() - self.pending_seconds
        self.saved_at = time.monotonic()
        try:
            if self.evaluation_due:  # the evaluation of the checkpoint's step failed: it comes first
                self.evaluate_and_record(bar)
                self.save_checkpoint()  # without the mark, so that it is done once
            while self.step < config.steps:
                self.pending.append(self.train_step(model))
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    entry = self.train_metrics(self.pending, time.perf_counter() - self.logged_at)
                    self.record(entry)
                    shown = ("nll", "bits_per_dim", "accuracy")
                    bar.set_postfix({k: f"{entry[k]:.4f}" for k in shown if k in entry})
                    self.pending, self.logged_at = [], time.perf_counter()
                if self.step % config.eval_every == 0 or self.step == config.steps:
                    with self.not_training_time():
                        self.evaluate_and_record(bar)
                if self.checkpoint_due():
                    with self.not_training_time():
                        self.save_checkpoint()
                if self.procs.any(stop.requested):
                    if self.saved_step != self.step:
                        self.save_checkpoint()
                    bar.write(f"stopped at step {self.step}; checkpoint written to {self.files.checkpoint}")
                    return True
        finally:
            bar.close()
        return False

    @contextlib.contextmanager
    def not_training_time(self) -> Iterator[None]:
        """Time that the next train record's ``steps_per_s`` leaves out (an evaluation, a checkpoint)."""
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.logged_at += time.perf_counter() - paused

    def finish(self, final_step: Callable[[FinishedRun], None]) -> None:
        """The main process's final files: ``final_step`` of the finished run (at least
        :meth:`FinishedRun.save_weights`)."""
        if not self.procs.main:
            return
        self.unwritten = [self.files.weights.name]
        final_step(FinishedRun(self.eval_model(), self.source, self.files, self.task, self.unwritten, self.step))

    def stopped_at_once(self, finishing: bool) -> str:
        """What a second signal left behind."""
        if not finishing:
            return (
                f"stopped at once at step {self.step}; {self.kept()}. Continue with: "
                f"iresnet train --out {self.files.root} --resume"
            )
        return (
            f"stopped at once while writing the final files: training is complete and {self.kept()}; not written: "
            f"{', '.join(self.unwritten)}. To write them: iresnet train --out {self.files.root} --resume"
        )


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    finish: Callable[[FinishedRun], None] | None = None,
) -> TrainResult:
    """Train the model ``config`` describes into ``config.out``; under ``torchrun``, with
    ``DistributedDataParallel`` over the processes (each takes a share of every batch). Torch's
    CPU thread count is ``config.threads`` while it runs (then back to what it was).

    Once training is complete, the main process hands the :class:`FinishedRun` to ``finish``,
    the caller's final step (``iresnet train`` gives
    :func:`iresnet.report.pictures.write_final_files`: the weights, then the pictures), while the
    run directory is still held and a first Ctrl-C lets it finish; without one, the weights alone
    are written (:meth:`FinishedRun.save_weights`)."""
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    procs = start_processes(config.device)
    try:
        with claimed_run(config, procs, resume) as config:
            trainer = _Trainer(config, procs, progress)
            trainer.restore(resume)
            if trainer.step > config.steps:  # before anything is written: the run stays as it is
                raise ValueError(
                    f"nothing to train: {config.out} is at step {trainer.step}, beyond steps={config.steps}; give "
                    "more steps to go on, or leave --steps out to keep the run's own"
                )
            if procs.main:
                parameters = sum(p.numel() for p in trainer.model.parameters())
                resuming = f", resuming at step {trainer.step}" if trainer.step else ""
                resuming += "".join(f"; {k} {old!r} -> {new!r}" for k, (old, new) in trainer.changed.items())
                print(f"{config.preset} preset on {config.data}: {parameters:,} parameters; run {config.out}{resuming}")
                save_config(config, trainer.files.config)
                if config.tensorboard:
                    trainer.writer = _tensorboard(trainer.files.root / "tensorboard")
            stop = StopRequests(quiet=not procs.main)
            try:
                with stop.installed():
                    interrupted = trainer.loop(stop)
                    if not interrupted:
                        stop.finishing = True
                        trainer.finish(finish or FinishedRun.save_weights)
            except StoppedAtOnce:
                raise StoppedAtOnce(trainer.stopped_at_once(stop.finishing)) from None
            return TrainResult(trainer.files.root, trainer.step, interrupted, trainer.evaluation, procs.main)
    finally:
        procs.close()
        torch.set_num_threads(threads)


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError("tensorboard=true needs the tensorboard package: pip install tensorboard") from error
    return SummaryWriter(str(path))
