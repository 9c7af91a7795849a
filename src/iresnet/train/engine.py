"""The training loop: a run directory with its config, metrics, atomic checkpoints, exact
resumption, a clean stop on Ctrl-C, a loud stop on a non-finite loss, warm-up, clipping, an
EMA for evaluation, and ``torchrun`` data parallelism."""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.compiled import memory_lean
from ..core.layers import initialize_from_data
from ..core.validation import NonFiniteInputError
from ..data.preprocess import bits_per_dim
from ..models.build import build_model
from .checkpoint import (
    RunFiles,
    RunInUseError,
    atomic_save,
    default_run_directory,
    read_checkpoint,
    remove_leftovers,
    run_lock,
    save_config,
    save_text,
    save_weights,
    write_error,
)
from .config import TrainConfig, upgrade_settings
from .distributed import Processes, start_processes
from .ema import ExponentialMovingAverage
from .evaluate import (
    ClassifierEvaluation,
    Evaluation,
    HybridEvaluation,
    eval_estimator,
    evaluate,
    evaluate_classifier,
    evaluate_hybrid,
    evaluation_randomness,
    recalibrate_batch_norms,
)
from .sources import DataSource, make_source

__all__ = ["StoppedAtOnce", "TrainingError", "TrainResult", "train"]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the last checkpoint is intact."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    interrupted: bool
    evaluation: Evaluation | None
    main: bool = True  # whether this is the process that writes (rank 0)


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: training stopped without finishing its step or its final
    files; the last checkpoint is intact (the message says which files were written)."""


class _StopRequests:
    """The first SIGINT / SIGTERM asks the loop to stop after the current step (it then writes a
    checkpoint), or, while the final weights and pictures are written, lets them finish; the
    next one raises :class:`StoppedAtOnce`. Each request says so at once on standard error."""

    def __init__(self, quiet: bool = False) -> None:
        self.requested = False
        self.finishing = False  # writing the final weights and pictures
        self.quiet = quiet  # a process other than the main one

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise StoppedAtOnce
        self.requested = True
        if self.quiet:
            return
        if self.finishing:
            _notice("stop requested: finishing the final pictures first (seconds); press Ctrl-C again to stop at once")
        else:
            _notice("stop requested: stopping after this step with a checkpoint; press Ctrl-C again to stop at once")

    @contextmanager
    def installed(self):
        try:
            previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: no handlers
            yield self
            return
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _notice(text: str) -> None:
    """A line on standard error from a signal handler: written to the file descriptor, since the
    handler may interrupt a write to ``sys.stderr`` (a progress bar's), which cannot be reentered."""
    try:
        os.write(sys.stderr.fileno(), f"\n{text}\n".encode())
    except (OSError, ValueError, AttributeError):  # no descriptor (captured output): nothing to say
        pass


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    kind = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}[config.optimizer]
    return kind(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _schedule(config: TrainConfig):
    """The learning-rate factor of a step: a linear warm-up, times ``lr_gamma`` for every
    milestone passed."""

    def factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        return warmup * config.lr_gamma ** bisect.bisect_right(config.lr_milestones, step)

    return factor


class _Trainer:
    def __init__(self, config: TrainConfig, procs: Processes, progress: bool) -> None:
        self.config, self.procs, self.progress = config, procs, progress
        self.files = RunFiles(config.out)
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
        if config.task != "density" and not hasattr(self.source, "labelled_batch"):
            raise ValueError(f"task {config.task!r} needs labelled image data, and {config.data!r} has no labels")
        if config.task != "density" and len(self.source.labelled) < config.batch_size:
            raise ValueError(
                f"labelled_fraction {config.labelled_fraction} keeps {len(self.source.labelled)} labelled images, "
                f"fewer than a batch of {config.batch_size}: raise the fraction or lower batch_size"
            )
        if config.precision == "bf16" and procs.device.type != "cuda":
            raise ValueError(
                f"precision=bf16 runs on CUDA only (bfloat16 autocast of the branches), and this run is on "
                f"{procs.device}: use precision=float32, or device=cuda on a machine with a GPU"
            )
        self.model = build_model(config.task, config.data, config.model).to(procs.device)
        self.optimizer = _optimizer(config, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config))
        self.ema = ExponentialMovingAverage(self.model, config.ema_decay) if config.ema_decay else None
        self.step = 0
        self.changed: dict[str, tuple[Any, Any]] = {}  # settings a resume changes: old and new values
        self.saved_step: int | None = None  # the step of the last checkpoint written or read
        self.pending: list[dict[str, float]] = []  # what the steps since the last train record logged
        self.pending_seconds = 0.0  # their time, from a checkpoint
        self.logged_at = time.perf_counter()  # when the last train record was written
        self.saved_at = time.monotonic()  # when the last checkpoint was written (or the loop began)
        self.evaluation: Evaluation | ClassifierEvaluation | HybridEvaluation | None = None
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
        if not self.files.checkpoint.exists():
            logged = self.files.metrics.exists() and self.files.metrics.read_text().strip()
            if resume:
                early = " (its run stopped before its first checkpoint)" if logged else ""
                raise FileNotFoundError(f"nothing to resume: {self.files.checkpoint} does not exist{early}")
            if logged:
                raise FileExistsError(
                    f"{self.files.root} holds {self.files.metrics.name} of an earlier run that stopped before its "
                    "first checkpoint: it cannot be resumed, and a new run there would add its records to the old "
                    f"ones. Choose another --out, or remove {self.files.root} (or move its metrics.jsonl away) to "
                    "start again there"
                )
            return
        state = read_checkpoint(self.files.checkpoint, self.procs.device)
        if not resume:
            raise FileExistsError(
                f"{self.files.root} already holds a run (checkpoint at step {state['step']}): pass --resume to "
                "continue it, or --out for a new run directory"
            )
        self.changed = _check_compatible(upgrade_settings(state["config"]), self.config)
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
            self._set_lr(self.config.lr)
        pending = state.get("pending", {"steps": [], "seconds": 0.0})  # older checkpoints: none
        self.pending, self.pending_seconds = list(pending["steps"]), pending["seconds"]
        if self.procs.main:
            _truncate_metrics(self.files.metrics, self.step)

    def _set_lr(self, lr: float) -> None:
        """Another learning rate for a resumed run: the schedule's factor at this step times ``lr``."""
        factor = _schedule(self.config)(self.step)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = lr, lr * factor
        self.scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

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

    def run_evaluation(self) -> Evaluation | ClassifierEvaluation | HybridEvaluation:
        with evaluation_randomness(self.procs.device):
            size = self.config.eval_size
            if self.config.task == "classify":
                test, labels = self.source.test[:size], self.source.test_labels[:size]
                return evaluate_classifier(self.eval_model(), test, labels, calibration=self.source.train)
            if self.config.task == "hybrid":
                images, labels = self.source.test[:size], self.source.test_labels[:size]
                estimator = eval_estimator(self.config.eval_logdet, discrete=True)
                return evaluate_hybrid(self.eval_model(), images, labels, estimator=estimator)
            discrete = self.source.levels is not None
            return evaluate(
                self.eval_model(),
                self.source.test[: self.config.eval_size],
                discrete=discrete,
                estimator=eval_estimator(self.config.eval_logdet, discrete),
            )

    # -- the loop ------------------------------------------------------------------------------
    def step_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This step's inputs on the device and their labels (``None`` for a density model). With
        a labelled fraction below 1 (and :math:`\\lambda > 0`), a hybrid's labelled batch is
        joined by a batch of unlabelled images: the first ``len(labels)`` rows are labelled."""
        config, procs = self.config, self.procs
        if config.task == "density":
            return self.source.batch(self.step, config.batch_size, procs.rank, procs.world).to(procs.device), None
        x, y = self.source.labelled_batch(self.step, config.batch_size, procs.rank, procs.world)
        if config.task == "hybrid" and config.labelled_fraction < 1 and config.hybrid_lambda > 0:
            x = torch.cat([x, self.source.batch(self.step, config.batch_size, procs.rank, procs.world)])
        return x.to(procs.device), y.to(procs.device)

    def objective(self, model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This step's loss (mean NLL of the data, cross-entropy of the labels, or the hybrid
        objective) and what to log."""
        if self.config.task == "hybrid":
            return self.hybrid_objective(model)
        x, y = self.step_batch()
        if self.config.task == "classify":
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            return loss, {"cross_entropy": loss.detach(), "accuracy": (logits.argmax(1) == y).double().mean()}
        loss = -model(x).mean()
        return loss, {"nll": loss.detach()}

    def hybrid_objective(self, model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r"""Cross-entropy of the labelled images plus :math:`\lambda` times the NLL per dimension
        of all the step's images (:meth:`step_batch`)."""
        config = self.config
        x, y = self.step_batch()
        logits, log_prob = model(x)
        logits = logits[: len(y)]
        cross_entropy = nn.functional.cross_entropy(logits, y)
        nll = -log_prob.mean()
        loss = cross_entropy + config.hybrid_lambda * nll / self.source.event_size
        accuracy = (logits.argmax(1) == y).double().mean()
        return loss, {"cross_entropy": cross_entropy.detach(), "accuracy": accuracy, "nll": nll.detach()}

    def train_step(self, model: nn.Module) -> dict[str, float]:
        config = self.config
        bf16 = config.precision == "bf16"
        lean = memory_lean() if config.compile else contextlib.nullcontext()
        try:
            with lean, torch.autocast(self.procs.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, logged = self.objective(model)
        except (ValueError, RuntimeError) as error:
            if not _non_finite(error):
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

    def train_metrics(self, steps: list[dict[str, float]], seconds: float) -> dict[str, Any]:
        """Means over the steps since the last record (the largest gradient norm)."""
        entry: dict[str, Any] = {"step": self.step, "split": "train"}
        for key in steps[0]:
            if key != "grad_norm":
                entry[key] = sum(s[key] for s in steps) / len(steps)
        if self.config.task != "classify" and self.source.levels is not None:
            entry["bits_per_dim"] = bits_per_dim(torch.tensor(-entry["nll"]), self.source.event_size).item()
        entry.update(
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=max(s["grad_norm"] for s in steps),
            steps_per_s=len(steps) / seconds,
        )
        return entry

    def test_metrics(self, evaluation: Evaluation | ClassifierEvaluation | HybridEvaluation) -> dict[str, Any]:
        if isinstance(evaluation, HybridEvaluation):
            classifier, density = evaluation.classifier, evaluation.density
            return {
                "step": self.step,
                "split": "test",
                "cross_entropy": classifier.nll,
                "accuracy": classifier.accuracy,
                "error_percent": classifier.error_percent,
                "error_percent_se": classifier.error_percent_se,
                "nll": density.nll,
                "nll_se": density.nll_se,
                "bits_per_dim": density.bits_per_dim,
                "bits_per_dim_se": density.bits_per_dim_se,
            }
        if isinstance(evaluation, ClassifierEvaluation):
            return {
                "step": self.step,
                "split": "test",
                "cross_entropy": evaluation.nll,
                "accuracy": evaluation.accuracy,
                "error_percent": evaluation.error_percent,
                "error_percent_se": evaluation.error_percent_se,
            }
        entry = {"step": self.step, "split": "test", "nll": evaluation.nll, "nll_se": evaluation.nll_se}
        if evaluation.bits_per_dim is not None:
            entry.update(bits_per_dim=evaluation.bits_per_dim, bits_per_dim_se=evaluation.bits_per_dim_se)
        return entry

    def loop(self, stop: _StopRequests) -> bool:
        """Train to ``config.steps``; returns whether a stop was requested first."""
        from tqdm.auto import tqdm

        config = self.config
        model = self.model
        if self.procs.world > 1:
            model = nn.parallel.DistributedDataParallel(self.model)
        bar = tqdm(total=config.steps, initial=self.step, disable=not (self.progress and self.procs.main), unit="step")
        if config.compile:
            initialize_from_data(self.model, self.step_batch()[0])  # no data-dependent branch in the graph
            model = torch.compile(model)
            bar.write("compiling the training step: the first steps take longer (seconds to minutes)")
        self.logged_at = time.perf_counter() - self.pending_seconds
        self.saved_at = time.monotonic()
        try:
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
                    if self.procs.main:
                        self.evaluation = self.run_evaluation()
                        self.record(self.test_metrics(self.evaluation))
                        bar.write(f"step {self.step}: {self.evaluation}")
                if self.checkpoint_due():
                    self.save_checkpoint()
                if self.procs.any(stop.requested):
                    if self.saved_step != self.step:
                        self.save_checkpoint()
                    bar.write(f"stopped at step {self.step}; checkpoint written to {self.files.checkpoint}")
                    return True
        finally:
            bar.close()
        return False

    def finish(self) -> None:
        """The evaluation weights alone, and the pictures (each written to a temporary file, then
        renamed). A picture that cannot be drawn (a diverged model) is reported and skipped: the
        run itself is complete."""
        if not self.procs.main:
            return
        self.unwritten = [self.files.weights.name, "the pictures"]
        print(f"writing the evaluation weights and the pictures to {self.files.root}", flush=True)
        from ..core.lipschitz import converge_spectral_norms
        from ..report.pictures import run_pictures

        model = self.eval_model()
        pictures = run_pictures(model, self.source, self.files, self.config.task)
        self.unwritten = [self.files.weights.name, *(path.name for path in pictures)]
        converge_spectral_norms(model)
        if self.config.task == "classify":
            recalibrate_batch_norms(model, self.source.train)
        save_weights(model, self.files.weights)
        self.unwritten.remove(self.files.weights.name)
        for path, draw in pictures.items():
            partial = path.with_name(f".{path.stem}.partial{path.suffix}")
            try:
                draw(partial)
                os.replace(partial, path)
                self.unwritten.remove(path.name)
            except Exception as error:  # reported; the run stays complete
                print(f"iresnet: {path.name} was not drawn: {error}", file=sys.stderr)
            finally:
                partial.unlink(missing_ok=True)

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


def _check_compatible(saved: dict[str, Any], config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """A resumed run may change how long it trains, its learning rate and clipping (the advice
    after a non-finite loss), how it logs and how its step is computed, not what it trains. A
    setting that the checkpoint lacks (it came later) had its default value. Returns the changed
    settings (but ``out``) with their old and new values."""
    free = {"steps", "out", "checkpoint_every", "checkpoint_seconds", "eval_every", "log_every", "tensorboard"}
    free |= {"device", "download", "lr", "grad_clip"}
    free |= {"compile", "precision", "threads"}  # how the same step is computed
    free |= {"eval_logdet"}  # how the test evaluations estimate, not what is trained
    saved = {**TrainConfig(out=config.out).to_dict(), **saved}
    new = config.to_dict()
    changed = [k for k, v in new.items() if k not in free and saved.get(k) != v]
    if changed:
        raise ValueError(
            "cannot resume with different settings for "
            + ", ".join(f"{k} ({saved.get(k)!r} -> {getattr(config, k)!r})" for k in changed)
        )
    return {k: (saved.get(k), v) for k, v in new.items() if k != "out" and saved.get(k) != v}


def _non_finite(error: BaseException) -> bool:
    """Whether an error raised inside a training step reports NaN or inf among a layer's inputs
    (:func:`iresnet.core.validation.check_input`: its error eagerly, its device assertion's message
    when compiled): the weights have diverged."""
    return isinstance(error, NonFiniteInputError) or (isinstance(error, RuntimeError) and "NaN or inf" in str(error))


def _truncate_metrics(path: Path, step: int) -> None:
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


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train the model ``config`` describes into ``config.out``; under ``torchrun``, with
    ``DistributedDataParallel`` over the processes (each takes a share of every batch). Torch's
    CPU thread count is ``config.threads`` while it runs (then back to what it was)."""
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    procs = start_processes(config.device)
    try:
        created = False  # whether this process made the run directory (then it removes it if setup fails)
        if config.out is None:  # every process takes the main process's choice
            chosen = default_run_directory(config.preset, resume) if procs.main else None
            config = dataclasses.replace(config, out=str(procs.gather(chosen)[0]))
            created = not resume
        with contextlib.ExitStack() as held:
            if procs.main:
                created = _make_directory(Path(config.out)) or created
            _hold(Path(config.out), procs, held)
            if procs.main and (removed := remove_leftovers(RunFiles(config.out))):
                print(f"removed {', '.join(removed)} in {config.out}, left by a write that was cut short")
            try:
                trainer = _Trainer(config, procs, progress)
                trainer.restore(resume)
            except BaseException:
                if created and procs.main:
                    _remove_if_empty(Path(config.out))
                raise
            if procs.main:
                parameters = sum(p.numel() for p in trainer.model.parameters())
                resuming = f", resuming at step {trainer.step}" if trainer.step else ""
                resuming += "".join(f"; {k} {old!r} -> {new!r}" for k, (old, new) in trainer.changed.items())
                print(f"{config.preset} preset on {config.data}: {parameters:,} parameters; run {config.out}{resuming}")
                save_config(config, trainer.files.config)
                if config.tensorboard:
                    trainer.writer = _tensorboard(trainer.files.root / "tensorboard")
            stop = _StopRequests(quiet=not procs.main)
            try:
                with stop.installed():
                    interrupted = trainer.loop(stop)
                    if not interrupted:
                        stop.finishing = True
                        trainer.finish()
            except StoppedAtOnce:
                raise StoppedAtOnce(trainer.stopped_at_once(stop.finishing)) from None
            return TrainResult(trainer.files.root, trainer.step, interrupted, trainer.evaluation, procs.main)
    finally:
        procs.close()
        torch.set_num_threads(threads)


def _make_directory(root: Path) -> bool:
    """Create ``root`` (and its parents); whether this call created it."""
    try:
        root.mkdir(parents=True)
        return True
    except FileExistsError:
        return False


def _hold(root: Path, procs: Processes, held: contextlib.ExitStack) -> None:
    """The main process locks the run directory until ``held`` closes; every process raises
    :class:`RunInUseError` if another run holds it."""
    refused = None
    if procs.main:
        try:
            held.enter_context(run_lock(root))
        except RunInUseError as error:
            refused = str(error)
    refused = procs.gather(refused)[0]
    if refused is not None:
        raise RunInUseError(refused)


def _remove_if_empty(root: Path) -> None:
    """Remove a run directory this process created when the run failed before writing anything."""
    with contextlib.suppress(OSError):  # never in the way of the error that ended the run
        if {p.name for p in root.iterdir()} <= {".lock"}:
            (root / ".lock").unlink(missing_ok=True)
            root.rmdir()


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError("tensorboard=true needs the tensorboard package: pip install tensorboard") from error
    return SummaryWriter(str(path))
