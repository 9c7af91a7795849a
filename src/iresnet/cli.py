"""The ``iresnet`` command line: argument parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .flows.density import DensityModel
    from .report.ood import OODReport
    from .train import TrainConfig
    from .train.sources import DataSource

_TRAIN_EPILOG = """settings come from the preset, then --config (a JSON object of settings), then the
flags, then KEY=VALUE overrides (model options as model.KEY=VALUE, e.g. model.hidden=64; an
estimator's options as model.logdet.KEY=VALUE or eval_logdet.KEY=VALUE, merged with the preset's
while the estimator's name stays); the resolved settings are saved as RUN/config.json. Under
torchrun the same command trains with DistributedDataParallel: torchrun --nproc-per-node 2 -m iresnet train ..."""


def _train_epilog() -> str:
    """The train command's epilog: how settings combine, every setting with its default, and
    each model builder's options with theirs."""
    import textwrap

    from .models import hybrid_model, image_flow, iresnet_classifier, toy_flow
    from .models.build import model_options
    from .train import TrainConfig

    def listed(defaults: dict[str, Any]) -> str:  # as typed: a word that is not JSON is a string
        shown = (
            value if isinstance(value, str) else json.dumps(value, separators=(",", ":")) for value in defaults.values()
        )
        items = " ".join(f"{name}={value}" for name, value in zip(defaults, shown))
        return textwrap.fill(items, 100, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False)

    settings = TrainConfig().to_dict()
    builders = [
        ("2-D data, toy_flow", toy_flow),
        ("images, image_flow", image_flow),
        ("--task hybrid, hybrid_model: classifier, then image_flow's", hybrid_model),
        ("--task classify, iresnet_classifier", iresnet_classifier),
    ]
    parts = [
        _TRAIN_EPILOG,
        "",
        "settings, KEY=VALUE (the fields of iresnet.train.TrainConfig; their defaults, which a preset changes):",
        listed(settings),
        "",
        "model options, model.KEY=VALUE (the builder's defaults, which a preset changes):",
    ]
    for title, builder in builders:
        options = model_options(builder)
        if builder is hybrid_model:
            options = {"classifier": options["classifier"]}
        parts += [f"  {title}:", listed(options)]
    return "\n".join(parts)


_DEVICE_HELP = "auto (the default: CUDA when a GPU is available, else the CPU), cpu, cuda, cuda:1, ..."


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _coefficient(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}")
    return value


def _add_train(commands: argparse._SubParsersAction) -> None:
    from .train.presets import PRESETS

    train = commands.add_parser(
        "train",
        help="train a density model, a classifier or a hybrid",
        description="Train a residual flow; with no arguments, the toy preset (8 Gaussians, minutes on a CPU).",
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--preset", help=f"one of: {', '.join(PRESETS)} (default toy)")
    train.add_argument("--config", help="a JSON file of settings, applied over the preset")
    train.add_argument("--task", help="density (default), classify, or hybrid (both, one network)")
    train.add_argument("--data", help="8gaussians, checkerboard, ..., digits, mnist, cifar10")
    train.add_argument("--data-dir", dest="data_dir", help="where MNIST / CIFAR-10 files are (or go)")
    train.add_argument("--download", action="store_const", const=True, help="download MNIST / CIFAR-10 if absent")
    train.add_argument("--steps", type=int, help="optimiser steps")
    train.add_argument("--batch-size", dest="batch_size", type=int)
    train.add_argument("--lr", type=float, help="learning rate after warm-up")
    train.add_argument(
        "--lambda", dest="hybrid_lambda", type=float, metavar="L", help="hybrid: log p(y|x) + L log p(x) / D"
    )
    train.add_argument(
        "--labelled-fraction", dest="labelled_fraction", type=float, metavar="F", help="keep the labels of a fraction F"
    )
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help=_DEVICE_HELP)
    train.add_argument(
        "--threads", type=_positive_int, metavar="N", help="CPU threads for torch in each process (default 1)"
    )
    train.add_argument("--out", help="the run directory (default runs/PRESET)")
    train.add_argument("--tensorboard", action="store_const", const=True, help="also write TensorBoard logs")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (default: the latest runs/PRESET) from its checkpoint, with the run's own "
        "settings; flags and KEY=VALUE given here change them (steps, lr, grad_clip, ...)",
    )
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any setting, e.g. ema_decay=0.999")


def _version() -> str:
    """The installed package's version; the source tree's where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iresnet")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    from .core.lipschitz import DEFAULT_COEFF

    parser = argparse.ArgumentParser(prog="iresnet", description="Invertible residual networks and residual flows.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)

    evaluate = commands.add_parser("eval", help="test NLL (and bits/dim) of a trained run, with standard errors")
    evaluate.add_argument("run", help="the run directory")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    evaluate.add_argument("--device", default="auto", help=_DEVICE_HELP)
    evaluate.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=500)
    evaluate.add_argument(
        "--ood",
        metavar="DATA",
        help="also the likelihoods of other data: noise, inverted, or an image data set with the run's shape; "
        "writes RUN/ood-DATA.png",
    )

    sample = commands.add_parser("sample", help="draw samples by inverting a trained flow; writes a PNG")
    sample.add_argument("run", help="the run directory")
    sample.add_argument("--n", type=_positive_int, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", help="the PNG to write (default RUN/samples.png)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument(
        "--by-class", action="store_true", help="a hybrid with a class-conditional prior: N samples of every class"
    )
    sample.add_argument("--device", default="auto", help=_DEVICE_HELP)

    rebuild = commands.add_parser(
        "reconstruct", help="invert a classifier's trunk from its features back to the inputs; writes a PNG"
    )
    rebuild.add_argument("run", help="the run directory of a classifier")
    rebuild.add_argument("--n", type=_positive_int, default=16, help="number of test images (default 16)")
    rebuild.add_argument("--out", help="the PNG to write (default RUN/reconstructions.png)")
    rebuild.add_argument("--device", default="auto", help=_DEVICE_HELP)

    demo = commands.add_parser("demo", help="build a residual block, certify, invert it and check its log-det")
    demo.add_argument("--dim", type=_positive_int, default=2, help="data dimension (default 2)")
    demo.add_argument("--hidden", type=_positive_int, default=64, help="hidden width of the branch (default 64)")
    demo.add_argument(
        "--coeff",
        type=_coefficient,
        default=DEFAULT_COEFF,
        help=f"spectral norm coefficient, 0 < c < 1 (default {DEFAULT_COEFF})",
    )
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _train(args: argparse.Namespace) -> int:
    from .train import RunInUseError, TrainingError, parse_override, resolve_config
    from .train.checkpoint import WriteError, default_run_directory, load_config

    flags = (
        "task",
        "data",
        "data_dir",
        "download",
        "steps",
        "batch_size",
        "lr",
        "hybrid_lambda",
        "labelled_fraction",
        "seed",
        "device",
        "threads",
        "out",
        "tensorboard",
    )
    overrides: list[dict[str, Any]] = [{k: getattr(args, k) for k in flags if getattr(args, k) is not None}]
    overrides += [parse_override(text) for text in args.overrides]
    saved = None
    if args.resume:  # the run's own settings, then what this command line changes
        run = args.out or default_run_directory(args.preset or "toy", resume=True)
        saved = dataclasses.replace(load_config(run), out=str(run))
    config = resolve_config(args.preset, args.config, overrides, saved=saved)
    try:
        return _train_and_report(args, config)
    except TrainingError as error:
        print(f"iresnet: {error}", file=sys.stderr)
        return 1
    except (RunInUseError, WriteError) as error:
        print(f"iresnet train: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, RunInUseError) else 1
    except KeyboardInterrupt as error:  # a second Ctrl-C (its message says what was kept), or one outside training
        print(f"iresnet train: {str(error) or 'interrupted'}", file=sys.stderr)
        return 130


def _train_and_report(args: argparse.Namespace, config: TrainConfig) -> int:
    from .train import train

    result = train(config, resume=args.resume, progress=args.progress)
    if not result.main:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted at step {result.step}; continue with: iresnet train --out {result.run_dir} --resume")
        return 130
    print(f"run written to {result.run_dir}")
    if result.evaluation is not None:
        print(result.evaluation)
        density = getattr(result.evaluation, "density", result.evaluation)  # a hybrid's density part
        if getattr(density, "bits_per_dim", None) is not None:
            _print_baselines(_baselines(_source(config)))
    return 0


def _source(config):
    from .train import make_source

    return make_source(
        config.data,
        config.seed,
        config.eval_size,
        config.data_dir,
        config.download,
        labelled_fraction=config.labelled_fraction,
    )


def _baselines(source) -> dict[str, Any]:
    """The independent-pixel and Gaussian baselines' test bits/dim, for a run on images."""
    from .train import evaluate_baselines

    return evaluate_baselines(source.train, source.test, source.levels)


def _print_baselines(baselines: dict[str, Any]) -> None:
    for name, value in baselines.items():
        print(f"  baseline, {name}: {value.bits_per_dim:.4f} +- {value.bits_per_dim_se:.4f} bits/dim")


def _evaluate(args: argparse.Namespace) -> int:
    """``iresnet eval``: the run's model and data, then its evaluation with the dequantisation
    noise and probes of training's evaluations."""
    from .train import load_run
    from .train.distributed import resolve_device
    from .train.evaluate import evaluation_randomness

    device = resolve_device(args.device)
    model, config = load_run(args.run, device)
    source = _source(config)
    if args.ood is not None and (config.task == "classify" or source.levels is None):
        raise ValueError(
            f"--ood needs a density model of images; {args.run} holds a {config.task} run on {config.data}"
        )
    if args.ood == config.data:
        raise ValueError(f"--ood {args.ood} is the run's own data set: choose noise, inverted or another data set")
    with evaluation_randomness(device):
        return _evaluate_model(args, model, config, source)


def _evaluate_model(args: argparse.Namespace, model: nn.Module, config: TrainConfig, source: DataSource) -> int:
    from dataclasses import asdict

    from .train import evaluate, evaluate_classifier, evaluate_hybrid
    from .train.evaluate import eval_estimator

    if config.task == "classify":
        result = evaluate_classifier(model, source.test, source.test_labels, args.batch_size, calibration=source.train)
        report = {"run": str(args.run), "data": config.data, "task": config.task, **asdict(result)}
        print(json.dumps(report) if args.json else result)
        _save_report(args, report)
        return 0
    discrete = source.levels is not None
    estimator = eval_estimator(config.eval_logdet, discrete)
    classifier = None
    if config.task == "hybrid":
        test = (source.test, source.test_labels)
        hybrid = evaluate_hybrid(model, *test, batch_size=args.batch_size, estimator=estimator)
        classifier, result, model = hybrid.classifier, hybrid.density, model.density
    if args.ood is not None:  # the comparison's test-set likelihoods are the usual evaluation
        comparison = _compare_ood(args, model, config, source)
        result = comparison.in_distribution
        picture = f"{args.run}/ood-{args.ood}.png"
        unwritten = _draw_ood(args.ood, config, comparison, picture)
        written = picture if unwritten is None else None
    elif classifier is None:
        result = evaluate(
            model,
            source.test,
            discrete=discrete,
            batch_size=args.batch_size,
            estimator=estimator,
            progress=not args.json,
        )
    baselines = _baselines(source) if discrete else {}
    report = {"run": str(args.run), "data": config.data, "task": config.task, **asdict(result)}
    if classifier is not None:
        report["classifier"] = asdict(classifier)
    if baselines:
        report["baselines"] = {name: asdict(value) for name, value in baselines.items()}
    if args.ood is not None:
        report["ood"] = {
            "data": args.ood,
            "in": asdict(comparison.in_distribution),
            "out": asdict(comparison.out_of_distribution),
            "auroc": comparison.auroc,
            "picture": written,
        }
    if args.json:
        print(json.dumps(report))
    else:
        print(result if classifier is None else f"{classifier}\n{result}")
        _print_baselines(baselines)
        if args.ood is not None:
            _print_ood(f"{config.data} test", args.ood, comparison, written)
    _save_report(args, report)
    if args.ood is not None and unwritten is not None:  # the figures are out; the picture is not
        _cannot_write(args, picture, unwritten)
        return 1
    return 0


def _compare_ood(args: argparse.Namespace, model: DensityModel, config: TrainConfig, source: DataSource) -> OODReport:
    """The likelihoods of the test set and of the ``--ood`` data."""
    from .report.ood import compare_likelihoods, ood_inputs
    from .train.evaluate import eval_estimator

    generator = torch.Generator().manual_seed(config.seed)
    out_images = ood_inputs(args.ood, source.test, source.levels, generator, config.data_dir, config.download)
    estimator = eval_estimator(config.eval_logdet, discrete=True)
    return compare_likelihoods(
        model, source.test, out_images, estimator, batch_size=args.batch_size, progress=not args.json
    )


def _draw_ood(data: str, config: TrainConfig, comparison: OODReport, picture: str) -> OSError | None:
    """The histograms of both likelihoods, written to ``picture``; the error where it cannot be."""
    from .report import plots

    labels = (f"{config.data} test", data)
    try:
        plots.likelihood_histograms(
            comparison.in_bits_per_dim, comparison.out_bits_per_dim, labels, comparison.auroc, path=picture
        )
    except OSError as error:
        return error
    return None


def _print_ood(in_name: str, out_name: str, comparison: OODReport, picture: str | None) -> None:
    print(f"{'data set':<20} {'n':>6}  bits/dim")
    for name, result in ((in_name, comparison.in_distribution), (out_name, comparison.out_of_distribution)):
        print(f"{name:<20} {result.n:>6}  {result.bits_per_dim:.4f} +- {result.bits_per_dim_se:.4f}")
    print(f"AUROC {comparison.auroc:.4f} (in-distribution = higher likelihood)")
    if picture is not None:
        print(f"likelihood histograms written to {picture}")


def _save_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """``RUN/eval.json``, written once the report is printed, and a line saying so (on standard
    error with ``--json``, whose standard output is the JSON alone); where it cannot be
    written, a warning, and the answer given stands."""
    path = Path(args.run) / "eval.json"
    try:
        path.write_text(json.dumps(report, indent=2))
    except OSError as error:
        _cannot_write(args, path, error, "warning")
        return
    print(f"report written to {path}", file=sys.stderr if args.json else sys.stdout)


def _cannot_write(args: argparse.Namespace, path: str | Path, error: OSError, kind: str = "error") -> None:
    """One line on standard error: which file the command could not write, and why."""
    print(f"iresnet {args.command}: {kind}: cannot write {path}: {error.strerror or error}", file=sys.stderr)


def _sample(args: argparse.Namespace) -> int:
    from .core.lipschitz import converge_spectral_norms
    from .report.pictures import draw_samples
    from .train import load_run
    from .train.distributed import resolve_device

    model, config = load_run(args.run, resolve_device(args.device))
    if config.task == "classify":
        raise ValueError(f"{args.run} holds a 'classify' run: only density and hybrid models can be sampled")
    if config.task == "hybrid":
        model = model.density
    if args.by_class and model.class_means is None:
        raise ValueError("--by-class needs a hybrid with a class-conditional prior (model.classifier=gaussians)")
    converge_spectral_norms(model)
    source = _source(config)
    path = args.out or f"{args.run}/samples.png"
    try:
        samples = draw_samples(model, source, path, args.n, args.seed, by_class=args.by_class)
    except OSError as error:
        _cannot_write(args, path, error)
        return 1
    rows = f", a row for each of the {len(model.class_means)} classes" if args.by_class else ""
    print(f"{len(samples)} samples written to {path}{rows}")
    return 0


def _iteration_cells(counts: list[int | None]) -> list[str]:
    """Iteration counts per block; the trunk inverts from its last block to its first, so the last
    block without a count failed and the ones before it were not reached."""
    failed = max((i for i, c in enumerate(counts) if c is None), default=None)
    return [str(c) if c is not None else "failed" if i == failed else "not reached" for i, c in enumerate(counts)]


def _reconstruct(args: argparse.Namespace) -> int:
    from .report import plots
    from .report.reconstruct import reconstruct
    from .train import load_run
    from .train.distributed import resolve_device

    device = resolve_device(args.device)
    model, config = load_run(args.run, device)
    if config.task != "classify":
        raise ValueError(f"{args.run} holds a {config.task!r} run: reconstruct inverts a classifier's trunk")
    source = _source(config)
    images = source.test[: args.n].to(device)
    result = reconstruct(model, images)
    print(f"{'block':>5} {'certified Lip(g)':>17} {'fixed-point iterations':>23} {'Anderson iterations':>20}")
    columns = []
    for method in ("fixed_point", "anderson"):
        counts = [block.iterations.get(method) for block in result.blocks]
        failed = max((i for i, c in enumerate(counts) if c is None), default=None)  # inverted last to first
        columns.append(
            [str(c) if c is not None else "failed" if i == failed else "not reached" for i, c in enumerate(counts)]
        )
    for i, block in enumerate(result.blocks):
        print(f"{i:>5} {block.bound:>17.4f} {columns[0][i]:>23} {columns[1][i]:>20}")
    if result.images is None:
        print(f"the inversion failed, so the trunk cannot be inverted from its features: {result.failure}")
        return 1
    path = args.out or f"{args.run}/reconstructions.png"
    shown = result.images.round().clamp(0, source.levels - 1).to(torch.uint8).cpu()
    scale = max(1, 64 // images.shape[-1])
    nrow = math.ceil(math.sqrt(len(images)))
    try:
        plots.side_by_side(images.cpu(), shown, path, levels=source.levels, scale=scale, nrow=nrow)
    except OSError as error:
        _cannot_write(args, path, error)
        return 1
    print(f"originals | reconstructions written to {path}")
    print(f"max abs error {result.max_error:.3g}, mean abs error {result.mean_error:.3g} (in intensity levels)")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "train":  # KEY=VALUE overrides may come after the flags too
        args.overrides += [text for text in unknown if "=" in text and not text.startswith("-")]
        unknown = [text for text in unknown if text not in args.overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "demo":
        from .report.demo import run_demo

        run_demo(dim=args.dim, hidden=args.hidden, coeff=args.coeff, seed=args.seed)
        return
    commands = {"train": _train, "eval": _evaluate, "sample": _sample, "reconstruct": _reconstruct}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            code = commands[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, FloatingPointError) as error:
        parser.exit(2, f"iresnet {args.command}: error: {error}\n")
    sys.exit(code)


_PACKAGE = Path(__file__).resolve().parent
_show_any_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """iresnet's own warnings as one line, ``iresnet: warning: ...``; others as Python shows them."""
    if Path(filename).resolve().is_relative_to(_PACKAGE):
        print(f"iresnet: warning: {message}", file=sys.stderr if file is None else file)
    else:
        _show_any_warning(message, category, filename, lineno, file, line)
