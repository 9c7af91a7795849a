"""What ``iresnet eval`` and the end of ``iresnet train`` report: a trained run's test figures
(its task's evaluation), with, for a density of images, two baselines beside them and, on
request, the likelihoods of other data (:mod:`iresnet.report.ood`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.images import image_spec
from ..tasks import (
    Evaluation,
    ImportanceWeighted,
    eval_estimator,
    evaluate_baselines,
    evaluate_importance_weighted,
    evaluation_randomness,
    get_task,
)
from ..train.checkpoint import load_run
from ..train.distributed import resolve_device
from ..train.sources import run_source
from . import plots
from .card import estimator_spec, estimator_words, report_card
from .ood import OODReport, compare_likelihoods, ood_inputs

if TYPE_CHECKING:
    from ..flows.density import DensityModel
    from ..train.config import TrainConfig
    from ..train.engine import TrainResult
    from ..train.sources import DataSource

__all__ = ["RunReport", "baselines", "evaluate_run", "save_report", "training_summary"]


@dataclass
class RunReport:
    """A run's evaluation: ``report`` (the JSON of ``eval.json``), ``text`` (the same for people),
    with an OOD comparison, its ``picture`` and the error that kept it from being written, and
    ``inverse_failure``, why the report card's inverse did not converge (its check failed)."""

    report: dict[str, Any]
    text: str
    picture: Path | None = None
    picture_error: OSError | None = None
    inverse_failure: str | None = None


def baselines(source: DataSource) -> dict[str, Evaluation]:
    """The independent-pixel and Gaussian baselines' test bits/dim, for a run on images."""
    images = source.image_data()
    return evaluate_baselines(images.train, images.test, images.levels)


def _baseline_lines(figures: dict[str, Evaluation]) -> list[str]:
    return [
        f"  baseline, {name}: {value.bits_per_dim:.4f} +- {value.bits_per_dim_se:.4f} bits/dim"
        for name, value in figures.items()
    ]


def evaluate_run(
    run: str | os.PathLike,
    *,
    device: str = "auto",
    batch_size: int = 500,
    ood: str | None = None,
    progress: bool = True,
    seeds: int = 3,
    iw: int | None = None,
) -> RunReport:
    """``iresnet eval``: the run's model on its whole test set, as training evaluates it (the same
    dequantisation noise and probes); for a density model, its report card
    (:func:`~iresnet.report.card.report_card`, over ``seeds`` evaluation seeds) under the key
    ``card``; for a density of images, the baselines beside it. ``ood``
    (noise, inverted, or an image data set of the run's shape) also scores those data, writing
    their likelihood histograms to ``RUN/ood-DATA.png``. ``iw`` (:math:`K \\ge 1`) adds, apart from
    the single-sample figures, the importance-weighted bits/dim over ``iw`` dequantisation samples
    per test image (:func:`~iresnet.tasks.evaluate_importance_weighted`), under the key ``iw``.
    ``ValueError`` where the run has no density of images to score other data with, or to
    importance-weight."""
    resolved = resolve_device(device)
    model, config = load_run(run, resolved)
    task, source = get_task(config.task), run_source(config)
    flow = task.flow(model)
    if ood is not None and (flow is None or not source.is_image):
        raise ValueError(f"--ood needs a density model of images; {run} holds a {config.task} run on {config.data}")
    if iw is not None and (flow is None or not source.is_image):
        raise ValueError(f"--iw needs a density model of images; {run} holds a {config.task} run on {config.data}")
    if iw is not None and iw < 1:
        raise ValueError(f"--iw must be at least 1, got {iw}")
    if ood == config.data:
        raise ValueError(f"--ood {ood} is the run's own data set: choose noise, inverted or another data set")
    with evaluation_randomness(resolved):
        comparison = None if ood is None or flow is None else _compare(flow, config, source, ood, batch_size, progress)
    card = None
    if task.report_card and flow is not None:
        card = report_card(
            flow,
            config,
            source,
            resolved,
            seeds=seeds,
            batch_size=batch_size,
            metrics=Path(run) / "metrics.jsonl",
            progress=progress,
        )
    with evaluation_randomness(resolved):
        density = (
            comparison.in_distribution if comparison is not None else None if card is None else card.evaluations[0]
        )
        evaluation = task.evaluate(
            model, source, batch_size=batch_size, progress=progress, density=density, eval_logdet=config.eval_logdet
        )
    figures, text = task.report(evaluation)
    report = {"run": str(run), "data": config.data, "task": config.task, **figures}
    lines = [text]
    if card is not None:
        report["card"] = card.report()
        lines = [f"{text}; log-det {estimator_words(card.eval_estimator)}", *card.lines()]
    if iw is not None and flow is not None:
        chosen = eval_estimator(config.eval_logdet, discrete=True)
        with evaluation_randomness(resolved):
            weighted = evaluate_importance_weighted(
                flow, source.test, iw, batch_size=batch_size, estimator=chosen, progress=progress
            )
        report["iw"] = _iw_report(weighted)
        lines.append(
            _iw_line(weighted, "the model's own" if chosen is None else estimator_words(estimator_spec(chosen)))
        )
    if flow is not None and source.is_image:
        scores = baselines(source)
        report["baselines"] = {name: asdict(value) for name, value in scores.items()}
        lines += _baseline_lines(scores)
    unsolved = None if card is None else card.inverse_failure
    if comparison is None or ood is None:  # comparison is None exactly where ood is
        return RunReport(report, "\n".join(lines), inverse_failure=unsolved)
    picture, error = Path(run) / f"ood-{ood}.png", None
    try:
        labels = (f"{config.data} test", ood)
        plots.likelihood_histograms(
            comparison.in_bits_per_dim, comparison.out_bits_per_dim, labels, comparison.auroc, path=picture
        )
    except OSError as failure:
        error = failure
    report["ood"] = {
        "data": ood,
        "in": asdict(comparison.in_distribution),
        "out": asdict(comparison.out_of_distribution),
        "auroc": comparison.auroc,
        "picture": None if error else str(picture),
    }
    chosen = eval_estimator(config.eval_logdet, discrete=True)  # as _compare scores both sets
    words = "the model's own" if chosen is None else estimator_words(estimator_spec(chosen))
    lines += _ood_lines(f"{config.data} test", ood, comparison, None if error else picture, words)
    return RunReport(report, "\n".join(lines), picture, error, unsolved)


def _iw_report(weighted: ImportanceWeighted) -> dict[str, Any]:
    """The ``iw`` entry of ``eval.json``."""
    keys = ("k", "bits_per_dim", "bits_per_dim_se", "nll", "nll_se")
    return {key: getattr(weighted, key) for key in keys}


def _iw_line(weighted: ImportanceWeighted, words: str) -> str:
    """The importance-weighted figure in words, labelled apart from the single-sample one."""
    return (
        f"importance-weighted (K={weighted.k}) {weighted.bits_per_dim:.4f} +- {weighted.bits_per_dim_se:.4f} "
        f"bits/dim (a bound over {weighted.k} dequantisation samples per image, not the single-sample figure "
        f"the papers report; log-det {words})"
    )


def _compare(
    flow: DensityModel, config: TrainConfig, source: DataSource, ood: str, batch_size: int, progress: bool
) -> OODReport:
    """The likelihoods of the test set and of the ``ood`` data."""
    generator = torch.Generator().manual_seed(config.seed)
    images = source.image_data()
    out_images = ood_inputs(ood, images.test, images.levels, generator, config.data_dir, config.download)
    estimator = eval_estimator(config.eval_logdet, discrete=True)
    return compare_likelihoods(flow, source.test, out_images, estimator, batch_size=batch_size, progress=progress)


def _ood_lines(in_name: str, out_name: str, comparison: OODReport, picture: Path | None, words: str) -> list[str]:
    lines = [f"{'data set':<20} {'n':>6}  bits/dim (log-det {words})"]
    for name, result in ((in_name, comparison.in_distribution), (out_name, comparison.out_of_distribution)):
        lines.append(f"{name:<20} {result.n:>6}  {result.bits_per_dim:.4f} +- {result.bits_per_dim_se:.4f}")
    lines.append(f"AUROC {comparison.auroc:.4f} (in-distribution = higher likelihood)")
    if picture is not None:
        lines.append(f"likelihood histograms written to {picture}")
    return lines


def save_report(run: str | os.PathLike, report: dict[str, Any]) -> Path:
    """``RUN/eval.json``, the report of :func:`evaluate_run` (``OSError`` where it cannot be written)."""
    path = Path(run) / "eval.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def training_summary(result: TrainResult, config: TrainConfig) -> str:
    """What ``iresnet train`` says of a completed run: where it is, its last test evaluation, and,
    for a density of images, the baselines beside it."""
    lines = [f"run written to {result.run_dir}"]
    if result.evaluation is not None:
        lines.append(str(result.evaluation))
        if get_task(config.task).generative and image_spec(config.data) is not None:
            lines += _baseline_lines(baselines(run_source(config)))
    return "\n".join(lines)
