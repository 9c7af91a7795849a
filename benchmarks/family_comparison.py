"""Benchmark: the invertible-residual family side by side, at matched parameters and wall-clock.

The variants (``model.block`` and ``model.lipschitz`` of the CLI), each built on the preset's
flow, its width chosen so that its parameter count is the closest to Residual Flows':

- ``resflow``: Residual Flows' residual blocks, spectral normalisation (the reference);
- ``aol``: the same blocks with AOL layers (no power iteration, a looser bound);
- ``densenet``: i-DenseNets' dense branches with CLipSwish;
- ``monotone``: Monotone Flows' Cayley blocks (a fixed-point solve in every forward pass);
- ``implicit``: Implicit Normalizing Flows' blocks (two branches and a solve per block).

``toy``: for each of the 8 toy densities the toy preset's flow (8 blocks of 3 linear layers,
coefficient 0.97, exact log-det; hidden 64 for resflow) trains with Adam (lr 5e-3 after 50 warm-up
steps, batch 256, fresh batches each step, EMA 0.99) for ``--seconds`` of wall-clock; its test
NLL is taken on 20,000 fresh points with the exact log-det. ``digits``: the digits preset's flow
(2 scales of 4 blocks and 2 fully-connected blocks; roulette log-det) trains with the preset's
recipe (Adam 2e-3 after 100 warm-up steps, batch 64, gradient clip 1, EMA 0.999) for
``--seconds``; its test bits/dim on the 297 test digits uses the accurate estimator (roulette with
20 exact terms, 4 probes). Standard errors are over test examples.

Every job is one process with one thread, ``--jobs`` of them at a time (2 on 2 cores). Budgets
and step times are the process's CPU time, which on an idle core is its wall-clock and which
other processes on the machine do not inflate: every variant gets the same compute. Per job: the
parameters, the steps done in the budget, the median time per step, the test NLL (bits/dim on
the digits) with its standard error, and the fixed-point iterations per block (mean over
blocks): those of the forward pass in training (monotone and implicit blocks solve one there),
and those of inverting the flow to draw 1,000 samples (float32 tolerance 1e-5).

    python benchmarks/family_comparison.py toy [--seconds 60] [--datasets 8gaussians ...] [--jobs 2]
    python benchmarks/family_comparison.py digits [--seconds 240] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

import iresnet
from iresnet.data.images import load_images
from iresnet.data.toy import TOY_DATASETS, sample_toy
from iresnet.models import image_flow, toy_flow
from iresnet.tasks.base import accurate_estimator
from iresnet.tasks.density import evaluate
from iresnet.train.ema import ExponentialMovingAverage
from iresnet.train.presets import PRESETS

VARIANTS: dict[str, dict[str, Any]] = {
    "resflow": {},
    "aol": {"lipschitz": "aol"},
    "densenet": {"block": "densenet"},
    "monotone": {"block": "monotone"},
    "implicit": {"block": "implicit"},
}

RECIPES = {
    "toy": {"batch": 256, "lr": 5e-3, "warmup": 50, "ema": 0.99, "clip": None},
    "digits": {"batch": 64, "lr": 2e-3, "warmup": 100, "ema": 0.999, "clip": 1.0},
}


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(data: str, variant: str, scale: float) -> nn.Module:
    """The preset's flow for ``variant`` with its widths multiplied by ``scale``."""
    if data == "digits":
        options = dict(PRESETS["digits"]["model"])
        options["hidden"] = max(1, round(options["hidden"] * scale))
        options["fc_hidden"] = max(1, round(options["fc_hidden"] * scale))
        return image_flow((1, 8, 8), 17, **options, **VARIANTS[variant])
    options = dict(PRESETS["toy"]["model"])
    options["hidden"] = max(1, round(options["hidden"] * scale))
    return toy_flow(2, **options, **VARIANTS[variant])


def matched_scale(data: str, variant: str) -> float:
    """The width scale whose parameter count is the closest to Residual Flows' at scale 1."""
    target = parameters(build(data, "resflow", 1.0))
    scales = [s / 64 for s in range(16, 193)]
    return min(scales, key=lambda s: abs(parameters(build(data, variant, s)) - target))


def solver_blocks(model: nn.Module) -> list[iresnet.ResidualBlock]:
    return [m for m in model.modules() if isinstance(m, iresnet.ResidualBlock)]


def mean_iterations(model: nn.Module) -> float | None:
    """The mean over blocks of the iterations of each block's last solve since the reset (``None`` if none)."""
    reports = [b.last_inversion.iterations for b in solver_blocks(model) if b.last_inversion is not None]
    return statistics.fmean(reports) if reports else None


def reset_reports(model: nn.Module) -> None:
    for block in solver_blocks(model):
        block.last_inversion = None


@dataclass
class Result:
    data: str
    variant: str
    parameters: int
    steps: int
    ms_per_step: float
    nll: float
    nll_se: float
    bits_per_dim: float | None
    bits_per_dim_se: float | None
    forward_iterations: float | None
    inverse_iterations: float | None


def run_job(data: str, dataset: str, variant: str, seconds: float, seed: int) -> Result:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    recipe = RECIPES[data]
    model = build(data, variant, matched_scale(data, variant))
    generator = torch.Generator().manual_seed(seed)
    if data == "digits":
        train_images, _ = load_images("digits", train=True)
        test_images, _ = load_images("digits", train=False)

        def batch() -> torch.Tensor:
            return train_images[torch.randint(len(train_images), (recipe["batch"],), generator=generator)]

    else:

        def batch() -> torch.Tensor:
            return sample_toy(dataset, recipe["batch"], generator)

    iresnet.initialize_from_data(model, batch())
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    ema = ExponentialMovingAverage(model, recipe["ema"])
    step_times: list[float] = []
    forward_iterations: list[float] = []
    spent = 0.0
    while spent < seconds:
        for group in optimizer.param_groups:
            group["lr"] = recipe["lr"] * min(1.0, (len(step_times) + 1) / recipe["warmup"])
        x = batch()
        start = time.process_time()
        reset_reports(model)
        loss = -model(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe["clip"] is not None:
            nn.utils.clip_grad_norm_(model.parameters(), recipe["clip"])
        optimizer.step()
        ema.update(model)
        step_times.append(time.process_time() - start)
        spent += step_times[-1]
        iterations = mean_iterations(model)
        if iterations is not None:
            forward_iterations.append(iterations)
    ema.copy_to(model)
    if data == "digits":
        result = evaluate(model, test_images, discrete=True, estimator=accurate_estimator())
    else:
        test = sample_toy(dataset, 20_000, torch.Generator().manual_seed(seed + 1))
        result = evaluate(model, test, discrete=False)
    reset_reports(model)
    with torch.no_grad():
        model.sample(1000)
    return Result(
        data=dataset,
        variant=variant,
        parameters=parameters(model),
        steps=len(step_times),
        ms_per_step=1000 * statistics.median(step_times),
        nll=result.nll,
        nll_se=result.nll_se,
        bits_per_dim=result.bits_per_dim,
        bits_per_dim_se=result.bits_per_dim_se,
        forward_iterations=statistics.fmean(forward_iterations) if forward_iterations else None,
        inverse_iterations=mean_iterations(model),
    )


def cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[Result], digits: bool) -> str:
    score = "test bits/dim" if digits else "test NLL (nats)"
    lines = [
        f"| data | variant | parameters | steps | ms/step | {score} | forward solve its | inverse its |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        value, se = (r.bits_per_dim, r.bits_per_dim_se) if digits else (r.nll, r.nll_se)
        lines.append(
            f"| {r.data} | {r.variant} | {r.parameters:,} | {r.steps} | {r.ms_per_step:.1f} | "
            f"{value:.3f} +- {se:.3f} | {cell(r.forward_iterations)} | {cell(r.inverse_iterations)} |"
        )
    return "\n".join(lines)


def pivot(results: list[Result], variants: list[str]) -> str:
    """Test NLL per density (rows) and variant (columns), then the mean over the densities (its
    standard error from the per-density ones), the mean steps, time per step and iterations."""
    datasets = list(dict.fromkeys(r.data for r in results))
    by = {(r.data, r.variant): r for r in results}
    lines = ["| test NLL (nats) | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for d in datasets:
        lines.append(f"| {d} | " + " | ".join(f"{by[d, v].nll:.3f} +- {by[d, v].nll_se:.3f}" for v in variants) + " |")

    def mean_of(field: str, v: str) -> float | None:
        values = [getattr(by[d, v], field) for d in datasets]
        return None if None in values else statistics.fmean(values)

    means = []
    for v in variants:
        se = math.sqrt(sum(by[d, v].nll_se ** 2 for d in datasets)) / len(datasets)
        means.append(f"{mean_of('nll', v):.3f} +- {se:.3f}")
    lines.append("| mean | " + " | ".join(means) + " |")
    for label, field, digits in [
        ("steps in the budget", "steps", 0),
        ("ms per step", "ms_per_step", 1),
        ("forward solve iterations", "forward_iterations", 1),
        ("inverse iterations", "inverse_iterations", 1),
    ]:
        lines.append(f"| {label} | " + " | ".join(cell(mean_of(field, v), digits) for v in variants) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", choices=["toy", "digits"])
    p.add_argument("--seconds", type=float, help="training CPU seconds per job (default 60 toy, 240 digits)")
    p.add_argument("--datasets", nargs="+", default=list(TOY_DATASETS), help="toy densities")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--jobs", type=int, default=2, help="processes at a time, one thread each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    seconds = args.seconds or (240.0 if args.data == "digits" else 60.0)
    datasets = ["digits"] if args.data == "digits" else args.datasets
    jobs = [(args.data, d, v, seconds, args.seed) for d in datasets for v in args.variants]
    print(f"torch {torch.__version__}, {len(jobs)} jobs of {seconds:.0f} s, {args.jobs} at a time, 1 thread each")
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_job, *zip(*jobs)))
    print(table(results, args.data == "digits"))
    if args.data == "toy":
        print()
        print(pivot(results, args.variants))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)


if __name__ == "__main__":
    main()
