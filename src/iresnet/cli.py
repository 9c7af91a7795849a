"""The ``iresnet`` command line: argument parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

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
    builders: list[tuple[str, Callable[..., Any]]] = [
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


def _temperature(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _seed(text: str) -> int:
    """An argparse type: a seed that torch.manual_seed takes, a 64-bit integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer from -2**63 to 2**64 - 1 (64 bits), got {value}")
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
    train.add_argument(
        "--data", help="8gaussians, checkerboard, ..., digits, mnist, mnist3x32, cifar10, patches16, patches32, faces"
    )
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

    evaluate = commands.add_parser(
        "eval", help="test NLL (and bits/dim) of a trained run, with standard errors, and a density run's report card"
    )
    evaluate.add_argument("run", help="the run directory")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    evaluate.add_argument("--device", default="auto", help=_DEVICE_HELP)
    evaluate.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=500)
    evaluate.add_argument(
        "--seeds",
        type=_positive_int,
        default=3,
        help="evaluation seeds of a density run's report card: its figure's mean and std over them (default 3)",
    )
    evaluate.add_argument(
        "--ood",
        metavar="DATA",
        help="also the likelihoods of other data: noise, inverted, or an image data set with the run's shape; "
        "writes RUN/ood-DATA.png",
    )
    evaluate.add_argument(
        "--iw",
        type=_positive_int,
        metavar="K",
        help="also the importance-weighted bits/dim over K dequantisation samples per test image (a tighter bound "
        "than the single-sample figure, printed apart from it; density runs on images)",
    )

    sample = commands.add_parser("sample", help="draw samples by inverting a trained flow; writes a PNG")
    sample.add_argument("run", help="the run directory")
    sample.add_argument("--n", type=_positive_int, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", help="the PNG to write (default RUN/samples.png)")
    sample.add_argument("--seed", type=_seed, default=0)
    sample.add_argument(
        "--temperature",
        type=_temperature,
        default=1.0,
        metavar="T",
        help="draw the latent with the prior's scale times T > 0 (default 1; below 1: smoother, typical samples)",
    )
    sample.add_argument(
        "--by-class", action="store_true", help="a hybrid with a class-conditional prior: N samples of every class"
    )
    sample.add_argument("--device", default="auto", help=_DEVICE_HELP)

    fid = commands.add_parser(
        "fid",
        help="the Frechet Inception distance between samples of an image run and its training images",
        description="FID of a run's samples against its training images (or --reference-stats), with a local "
        "Inception-v3 weights file (torch-fidelity's; nothing is downloaded). Needs: pip install 'iresnet[fid]'.",
    )
    fid.add_argument("run", help="the run directory of an image density model or hybrid")
    fid.add_argument("--weights", required=True, metavar="PATH", help="torch-fidelity's Inception-v3 weights (.pth)")
    fid.add_argument(
        "--reference-stats", dest="reference_stats", metavar="PATH", help="an .npz of mu and sigma to compare with"
    )
    fid.add_argument("--n", type=_positive_int, default=1000, help="samples (and training images) (default 1000)")
    fid.add_argument("--seed", type=_seed, default=0)
    fid.add_argument("--temperature", type=_temperature, default=1.0, metavar="T", help="as for sample (default 1)")
    fid.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=100)
    fid.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    fid.add_argument("--device", default="auto", help=_DEVICE_HELP)

    rebuild = commands.add_parser(
        "reconstruct",
        help="invert a classifier's trunk from its features, or an image flow from its latents, back to the "
        "inputs; writes a PNG",
    )
    rebuild.add_argument("run", help="the run directory of a classifier or of an image flow")
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
    demo.add_argument("--seed", type=_seed, default=0)
    return parser


def _train(args: argparse.Namespace) -> int:
    from .report.evaluation import training_summary
    from .report.pictures import write_final_files
    from .train import RunDirectoryError, RunInUseError, TrainingError, parse_override, resolve_config, train
    from .train.checkpoint import WriteError, resumed_config
    from .train.stopping import sigterm_interrupts

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
    saved = resumed_config(args.out, args.preset) if args.resume else None  # then what this command line changes
    config = resolve_config(args.preset, args.config, overrides, saved=saved)
    try:
        with sigterm_interrupts():
            result = train(config, resume=args.resume, progress=args.progress, finish=write_final_files)
        if result.main and result.interrupted:
            print(f"interrupted at step {result.step}; continue with: iresnet train --out {result.run_dir} --resume")
        elif result.main:
            print(training_summary(result, config))
        return 130 if result.interrupted else 0
    except TrainingError as error:
        print(f"iresnet: {error}", file=sys.stderr)
        return 1
    except (RunInUseError, WriteError) as error:
        print(f"iresnet train: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, RunInUseError) else 1
    except RunDirectoryError as error:  # making or locking it (a file in the way, a place not writable)
        print(f"iresnet train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:  # a second Ctrl-C (its message says what was kept), or one outside training
        print(f"iresnet train: {str(error) or 'interrupted'}", file=sys.stderr)
        return 130


def _evaluate(args: argparse.Namespace) -> int:
    """``iresnet eval``: the figures first, then ``RUN/eval.json`` (a warning where it cannot be
    written: the answer was given), then the OOD picture's error, if any."""
    from .report.evaluation import evaluate_run, save_report

    result = evaluate_run(
        args.run,
        device=args.device,
        batch_size=args.batch_size,
        ood=args.ood,
        progress=not args.json,
        seeds=args.seeds,
        iw=args.iw,
    )
    print(json.dumps(result.report) if args.json else result.text)
    try:
        path = save_report(args.run, result.report)
        print(f"report written to {path}", file=sys.stderr if args.json else sys.stdout)
    except OSError as error:
        _cannot_write(args, Path(args.run) / "eval.json", error, "warning")
    code = 0
    if result.inverse_failure is not None:  # the figures above need no inverse
        print(_unsolved(args, "the report card's inverse check failed", result.inverse_failure), file=sys.stderr)
        code = 1
    if result.picture_error is not None:
        _cannot_write(args, result.picture or f"the picture of --ood {args.ood}", result.picture_error)
        code = 1
    return code


_UNSOLVED = {"eval": "the run cannot be evaluated", "sample": "no samples were drawn", "fid": "no samples were drawn"}
"""What a command could not do where its run's inverse (or a block's solve) does not converge."""


def _unsolved(args: argparse.Namespace, what: str, failure: str) -> str:
    """One line: what the command could not do, the inverse that did not converge, and how to
    allow it more iterations (the solver's settings of a run may change on --resume)."""
    from .core.inverse import MAX_ITER
    from .train.checkpoint import load_config

    said = f"iresnet {args.command}: error: {what}: the inverse did not converge: {failure}"
    if "not finite" in failure:  # diverged: more iterations cannot help
        return f"{said} The run's weights may hold values too large to invert; more iterations will not help."
    now = load_config(args.run).model.get("max_iter", MAX_ITER)
    return (
        f"{said} Allow it more iterations (model.max_iter is {now}): "
        f"iresnet train --out {args.run} --resume model.max_iter={max(2 * now, MAX_ITER)}"
    )


def _cannot_write(args: argparse.Namespace, path: str | Path, error: OSError, kind: str = "error") -> None:
    """One line on standard error: which file the command could not write, and why."""
    print(f"iresnet {args.command}: {kind}: cannot write {path}: {error.strerror or error}", file=sys.stderr)


def _sample(args: argparse.Namespace) -> int:
    from .report.pictures import sample_run

    samples = sample_run(
        args.run,
        args.n,
        seed=args.seed,
        out=args.out,
        by_class=args.by_class,
        device=args.device,
        temperature=args.temperature,
    )
    if samples.error is not None:
        _cannot_write(args, samples.path, samples.error)
        return 1
    print(samples)
    return 0


def _fid(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .report.fid import fid_run

    result = fid_run(
        args.run,
        args.weights,
        reference_stats=args.reference_stats,
        n=args.n,
        seed=args.seed,
        temperature=args.temperature,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(json.dumps(asdict(result)) if args.json else result)
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    from .report.reconstruct import reconstruct_run

    done = reconstruct_run(args.run, args.n, out=args.out, device=args.device)
    print(done.table())
    if done.reconstruction.images is None:
        return 1
    if done.error is not None:
        _cannot_write(args, done.path, done.error)
        return 1
    print(done.summary())
    return 0


_COMMANDS = ("train", "eval", "sample", "fid", "reconstruct", "demo")


def main(argv: Sequence[str] | None = None) -> None:
    """``iresnet COMMAND ...``; Ctrl-C anywhere (the imports, loading a run or data, the work)
    is one line, ``iresnet COMMAND: interrupted``, and exit status 130."""
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        _main(words)
    except KeyboardInterrupt:  # train reports its own once training runs, with what was kept
        _interrupted(words)


def _interrupted(words: Sequence[str]) -> NoReturn:
    """``iresnet COMMAND: interrupted`` on standard error, then exit 130."""
    command = next((f" {word}" for word in words if word in _COMMANDS), "")
    print(f"iresnet{command}: interrupted", file=sys.stderr)
    sys.exit(130)


def interrupted_while_importing() -> None:
    """Ctrl-C while ``import iresnet`` loads torch, before :func:`main` runs: where this process is
    the ``iresnet`` command (the script, or ``python -m iresnet``), its one line and exit 130;
    elsewhere nothing (the package's import then raises the ``KeyboardInterrupt`` on)."""
    argv = getattr(sys, "orig_argv", [])  # while python -m imports the package, sys.argv[0] is "-m"
    module = sys.argv[:1] == ["-m"] and any(a == "-m" and b == "iresnet" for a, b in zip(argv, argv[1:]))
    if module or Path(sys.argv[0]).name == "iresnet":
        _interrupted(sys.argv[1:])


def _main(argv: Sequence[str]) -> None:
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
    from .core.inverse import InversionError

    commands = {"train": _train, "eval": _evaluate, "sample": _sample, "fid": _fid, "reconstruct": _reconstruct}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            code = commands[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, FloatingPointError) as error:
        parser.exit(2, f"iresnet {args.command}: error: {error}\n")
    except InversionError as error:  # reconstruct reports its own; train's, from an evaluation, says what was saved
        if args.command in _UNSOLVED:
            print(_unsolved(args, _UNSOLVED[args.command], str(error)), file=sys.stderr)
        else:
            failure = f"the inverse did not converge: {error}{_notes(error)}"
            print(f"iresnet {args.command}: error: {failure}", file=sys.stderr)
        code = 1
    except RuntimeError as error:  # torch's allocator; a model that does not fit is refused before training
        from .train.engine import allocation, out_of_memory

        if not out_of_memory(error):
            raise
        print(
            f"iresnet {args.command}: error: out of memory: {allocation(error)}; choose {_SMALLER[args.command]}"
            f"{_notes(error)}",
            file=sys.stderr,
        )
        code = 1
    sys.exit(code)


_SMALLER = {
    "train": "a smaller batch_size or eval_size, or smaller model settings",
    "eval": "a smaller --batch-size",
    "sample": "fewer samples (--n)",
    "fid": "a smaller --batch-size",
    "reconstruct": "fewer images (--n)",
}
"""What to make smaller where a command runs out of memory."""


def _notes(error: BaseException) -> str:
    """The notes an error carries (Python 3.11's ``add_note``: what training saved, say), after a
    semicolon; nothing without."""
    notes = getattr(error, "__notes__", [])
    return "".join(f"; {note.removeprefix('iresnet: ')}" for note in notes)


_PACKAGE = Path(__file__).resolve().parent
_show_any_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """iresnet's own warnings as one line, ``iresnet: warning: ...``; others as Python shows them."""
    if Path(filename).resolve().is_relative_to(_PACKAGE):
        print(f"iresnet: warning: {message}", file=sys.stderr if file is None else file)
    else:
        _show_any_warning(message, category, filename, lineno, file, line)
