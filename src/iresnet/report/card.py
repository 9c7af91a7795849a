"""The report card of a density run (``iresnet eval``): its test figure over several evaluation
seeds, its size, its cost (time per training step, the evaluation's peak memory), its log-det
estimators, how well its inverse reconstructs test inputs, and each block's certified Lipschitz
bound against the one its coefficients promise."""

from __future__ import annotations

import contextlib
import inspect
import json
import resource
import statistics
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.certificates import design_bound, lipschitz_bound
from ..core.implicit import ImplicitBlock
from ..core.inverse import InversionError
from ..core.lipschitz import DEFAULT_COEFF, converge_spectral_norms
from ..core.logdet import LogDetEstimator
from ..core.monotone import MonotoneBlock
from ..core.residual import ResidualBlock
from ..data.preprocess import UniformDequantize, VariationalDequantize
from ..flows.composition import Sequential
from ..tasks import EVAL_SEED, Evaluation, eval_estimator, evaluate, evaluation_randomness

if TYPE_CHECKING:
    from ..flows.density import DensityModel
    from ..train.config import TrainConfig
    from ..train.sources import DataSource

__all__ = [
    "BlockCertificate",
    "ReportCard",
    "block_certificates",
    "blocks_of",
    "estimator_spec",
    "estimator_words",
    "reconstruction_errors",
    "report_card",
    "round_trip",
    "step_seconds",
]

RECONSTRUCTED = 64
"""How many test inputs the card maps to the latent and back."""


@dataclass
class BlockCertificate:
    """One branch of a block: its certified :math:`\\mathrm{Lip}(g)`, the bound its coefficients
    promise (``None`` where they promise none) and the fixed-point iterations of its last inversion
    (``None`` where it ran none)."""

    index: int
    kind: str
    certified: float
    design: float | None
    iterations: int | None

    @property
    def exceeds(self) -> bool:
        """Whether the certified bound is above the promised one: the certificate cannot confirm
        the design. A loose certificate (the circular-convolution bound of a convolution too large
        on both sides for the exact ones) does this; so would a normalised layer whose norm is above
        its coefficient."""
        return self.design is not None and self.certified > self.design


@dataclass
class ReportCard:
    """A density run's card: the evaluation per seed, in ``unit`` (bits/dim for images, nats
    otherwise), and the rest as :func:`report_card` describes it."""

    seeds: list[int]
    evaluations: list[Evaluation]
    unit: str
    parameters: int
    step_seconds: float | None
    peak_memory: int
    memory_kind: str
    train_estimator: dict[str, Any]
    eval_estimator: dict[str, Any]
    reconstructed: int
    max_error: float | None
    mean_error: float | None
    coeff: float
    blocks: list[BlockCertificate]
    inverse_failure: str | None = None
    """Why the inverse of the reconstructed inputs did not converge (then no errors), or ``None``."""

    def values(self) -> list[float]:
        """The test figure of each seed, in :attr:`unit`."""
        if self.unit == "bits/dim":
            return [e.bits_per_dim for e in self.evaluations if e.bits_per_dim is not None]
        return [e.nll for e in self.evaluations]

    def report(self) -> dict[str, Any]:
        """The card as JSON (the key ``card`` of ``eval.json``)."""
        values = self.values()
        iterations = [b.iterations for b in self.blocks if b.iterations is not None]
        return {
            "unit": self.unit,
            "seeds": self.seeds,
            "per_seed": values,
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,  # one seed: no spread
            "se": self._first_se(),
            "parameters": self.parameters,
            "step_seconds": self.step_seconds,
            "peak_memory_bytes": self.peak_memory,
            "peak_memory_kind": self.memory_kind,
            "train_logdet": self.train_estimator,
            "eval_logdet": self.eval_estimator,
            "reconstruction": {
                "n": self.reconstructed,
                "max_abs_error": self.max_error,
                "mean_abs_error": self.mean_error,
                "iterations_mean": statistics.fmean(iterations) if iterations else None,
                "iterations_max": max(iterations, default=None),
                "failure": self.inverse_failure,
            },
            "coeff": self.coeff,
            "blocks": [{**asdict(b), "exceeds": b.exceeds} for b in self.blocks],
        }

    def _first_se(self) -> float | None:
        first = self.evaluations[0]
        return first.bits_per_dim_se if self.unit == "bits/dim" else first.nll_se

    def lines(self) -> list[str]:
        """The card for people: a few aligned lines and the blocks' table."""
        figures = self.report()
        words = estimator_words(self.eval_estimator)
        recon = figures["reconstruction"]
        step = "not recorded" if self.step_seconds is None else f"{self.step_seconds * 1e3:.2f} ms"
        iterations = (
            "none"
            if recon["iterations_max"] is None
            else (f"{recon['iterations_mean']:.1f} mean, {recon['iterations_max']} max per block")
        )
        inverse = (
            f"{self.reconstructed} test inputs to the latent and back: max abs error {self.max_error:.2e}, mean "
            f"{self.mean_error:.2e}; fixed-point iterations {iterations}"
            if self.inverse_failure is None
            else f"FAILED: {self.reconstructed} test inputs to the latent and back: {self.inverse_failure}"
        )
        std = figures["std"]
        spread, over = ("", "one seed") if std is None else (f"+- {std:.4f} ", "std over seeds")
        lines = [
            f"report card over {len(self.seeds)} evaluation seeds ({', '.join(map(str, self.seeds))}):",
            f"  {'test':<22} {figures['mean']:.4f} {spread}{self.unit} ({over}; {words}); per-example se "
            f"{figures['se']:.4f}",
            f"  {'parameters':<22} {self.parameters:,}",
            f"  {'time per train step':<22} {step}",
            f"  {'peak eval memory':<22} {self.peak_memory / 2**20:.1f} MiB per batch ({self.memory_kind})",
            f"  {'train log-det':<22} {estimator_words(self.train_estimator)}",
            f"  {'eval log-det':<22} {words}",
            f"  {'inverse':<22} {inverse}",
            f"  {'block':>5}  {'kind':<12} {'certified Lip(g)':>16} {f'design (coeff {self.coeff:g})':>20} "
            f"{'iterations':>10}",
        ]
        for b in self.blocks:
            design = "-" if b.design is None else f"{b.design:.4f}"
            its = "-" if b.iterations is None else str(b.iterations)
            flag = "  not confirmed (certificate above design)" if b.exceeds else ""
            lines.append(f"  {b.index:>5}  {b.kind:<12} {b.certified:>16.4f} {design:>20} {its:>10}{flag}")
        return lines


def estimator_spec(estimator: LogDetEstimator) -> dict[str, Any]:
    """An estimator's name and options, as the setting ``model.logdet`` takes them."""
    name = type(estimator).__name__
    names = {"Exact": "exact", "PowerSeries": "series", "Roulette": "roulette"}
    options = inspect.signature(type(estimator)).parameters
    return {"name": names.get(name, name), **{k: getattr(estimator, k) for k in options if hasattr(estimator, k)}}


def estimator_words(spec: dict[str, Any]) -> str:
    """``"roulette, 20 exact terms, geometric(0.5) tail, 4 probes"``: an :func:`estimator_spec` in
    words, the roulette's tail named, since the papers differ there (Residual Flows evaluates
    with a Poisson(2) tail), and a truncated series called biased (the i-ResNet code evaluates
    with one)."""
    words = [spec["name"]]
    if "n_terms" in spec:
        words.append(f"{spec['n_terms']} terms (truncated: biased)")
    if "n_exact_terms" in spec:
        words.append(f"{spec['n_exact_terms']} exact terms")
    if spec.get("distribution") == "geometric":
        words.append(f"geometric({spec['p']:g}) tail")
    elif spec.get("distribution") == "poisson":
        words.append(f"Poisson({spec['rate']:g}) tail")
    if "n_probes" in spec:
        words.append(f"{spec['n_probes']} probe{'s' if spec['n_probes'] != 1 else ''}")
    return ", ".join(words)


def step_seconds(metrics: Path) -> float | None:
    """The mean wall seconds per training step over the train records of ``metrics.jsonl``
    (``None`` where none records its speed)."""
    if not metrics.exists():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    speeds = [r["steps_per_s"] for r in records if r.get("split") == "train" and r.get("steps_per_s")]
    return statistics.fmean(1 / s for s in speeds) if speeds else None


@contextlib.contextmanager
def _peak_memory(device: torch.device, found: list[tuple[int, str]]) -> Iterator[None]:
    """Appends to ``found`` the peak memory of the context and what measured it: CUDA's
    ``max_memory_allocated`` on a GPU, else the increase of the process's peak resident set."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield
        found.append((torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"))
        return
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    found.append(((after - before) * unit, "CPU: increase of the peak RSS, 0 where an earlier peak was higher"))


def blocks_of(model: nn.Module) -> list[ResidualBlock | ImplicitBlock]:
    """The model's blocks in order (an implicit block's inner blocks only as part of it)."""
    inner = {id(m) for m in model.modules() if isinstance(m, ImplicitBlock) for m in (m.explicit, m.implicit)}
    return [m for m in model.modules() if isinstance(m, (ResidualBlock, ImplicitBlock)) and id(m) not in inner]


def _branches(block: ResidualBlock | ImplicitBlock) -> list[tuple[str, ResidualBlock]]:
    if isinstance(block, ImplicitBlock):
        return [("implicit g_x", block.explicit), ("implicit g_z", block.implicit)]
    return [("monotone" if isinstance(block, MonotoneBlock) else "residual", block)]


def block_certificates(model: nn.Module) -> list[BlockCertificate]:
    """Each branch's certified and promised :math:`\\mathrm{Lip}(g)` (its block's shape known,
    from a forward pass) and its last inversion's iterations."""
    rows = []
    for index, block in enumerate(blocks_of(model)):
        for kind, branch in _branches(block):
            if branch.event_shape is None:
                raise ValueError(f"block {index} has not seen an input: run the model forward first")
            last = None if branch.last_inversion is None else branch.last_inversion.iterations
            certified = lipschitz_bound(branch.g, branch.event_shape)
            rows.append(BlockCertificate(index, kind, certified, design_bound(branch.g), last))
    return rows


@torch.no_grad()
def round_trip(model: DensityModel, inputs: Tensor) -> tuple[Tensor, Tensor, Sequential]:
    """``inputs`` dequantised, mapped to the latent and inverted back, in eval mode with spectral
    norms converged: the dequantised inputs, their reconstruction (in the same space; the
    dequantisation's rounding is not inverted) and the dequantisation layers, whose inverse
    rounds a reconstruction back to levels. Each block's ``last_inversion`` then reports the
    inverse."""
    model.eval()
    converge_spectral_norms(model)
    layers = list(model.transform) if isinstance(model.transform, Sequential) else [model.transform]
    dequantisers = []
    x = inputs
    while layers and isinstance(layers[0], (UniformDequantize, VariationalDequantize)):
        dequantisers.append(layers.pop(0))
        x, _ = dequantisers[-1](x)
    transform = Sequential(*layers)
    z, _ = transform(x)
    for block in model.modules():
        if isinstance(block, ResidualBlock):
            block.last_inversion = None
    return x, transform.inverse(z), Sequential(*dequantisers)


def reconstruction_errors(model: DensityModel, inputs: Tensor) -> tuple[float, float]:
    """The max and mean absolute error of :func:`round_trip`'s reconstruction of ``inputs``."""
    x, reconstruction, _ = round_trip(model, inputs)
    difference = (reconstruction - x).abs()
    return difference.max().item(), difference.mean().item()


def report_card(
    model: DensityModel,
    config: TrainConfig,
    source: DataSource,
    device: torch.device,
    *,
    seeds: int = 3,
    batch_size: int = 500,
    metrics: Path | None = None,
    progress: bool = False,
) -> ReportCard:
    """The card of a density run's ``model``: the test evaluation under ``seeds`` evaluation seeds
    (:data:`~iresnet.tasks.EVAL_SEED` first, so that the first is the usual evaluation), each
    reseeding the dequantisation noise and the estimator's draws; the peak memory of the first;
    the time per step recorded in ``metrics``; and the inverse and the certificates. An inverse
    that does not converge is reported (:attr:`ReportCard.inverse_failure`), not raised."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    discrete = source.is_image
    chosen = eval_estimator(config.eval_logdet, discrete)
    trained = next(b.logdet for b in model.modules() if isinstance(b, ResidualBlock) and b.logdet is not None)
    seed_list = [EVAL_SEED + i for i in range(seeds)]
    evaluations: list[Evaluation] = []
    memory: list[tuple[int, str]] = []
    for seed in seed_list:
        with evaluation_randomness(device, seed), _peak_memory(device, memory):
            evaluations.append(
                evaluate(
                    model, source.test, discrete=discrete, batch_size=batch_size, estimator=chosen, progress=progress
                )
            )
    with evaluation_randomness(device):
        inputs = source.test[:RECONSTRUCTED].to(device)
        errors: tuple[float | None, float | None] = (None, None)
        failure = None
        try:
            errors = reconstruction_errors(model, inputs)
        except InversionError as error:  # the figures need no inverse: they stand, the check failed
            failure = str(error)
    parameters = sum(p.numel() for p in model.parameters())
    return ReportCard(
        seeds=seed_list,
        evaluations=evaluations,
        unit="bits/dim" if discrete else "nats",
        parameters=parameters,
        step_seconds=None if metrics is None else step_seconds(metrics),
        peak_memory=memory[0][0],
        memory_kind=memory[0][1],
        train_estimator=estimator_spec(trained),
        eval_estimator=estimator_spec(trained if chosen is None else chosen),
        reconstructed=len(inputs),
        max_error=errors[0],
        mean_error=errors[1],
        coeff=config.model.get("coeff", DEFAULT_COEFF),
        blocks=block_certificates(model),
        inverse_failure=failure,
    )
