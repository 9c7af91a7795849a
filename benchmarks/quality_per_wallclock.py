"""Benchmark: trained for the same wall-clock time, which library gives the better test NLL?

For each toy data set the residual flow of toy_flow_vs_normflows.py (16 x [ActNorm, residual
block], branch ``Swish, Linear(2,128), Swish, Linear(128,128), Swish, Linear(128,2)``, coefficient
0.9) trains for --seconds of wall-clock at batch 512 with Adam, on fresh batches drawn every step
from the data set's sampler (the same batches for every contender). Every contender starts from
the same function: normflows' initialisation (seed 0, ActNorms initialised on the first training
batch), copied into iresnet. The log-det is each library's Roulette estimator with normflows'
recommended settings (its Residual flow's defaults, as its residual-flow example uses them): 2
exact terms, geometric(0.5) tail, 1 Hutchinson probe, Neumann gradient computed in the forward
pass; 5 power iterations per step. Contenders: iresnet eager, iresnet under ``torch.compile``
(--compile; its compile warm-up counts inside the budget) and normflows. Afterwards, in eval mode
with converged spectral norms, the test NLL on 20,000 fresh points with the exact log-det (d = 2):
iresnet's Exact estimator, normflows by the Jacobian of its whole data-to-latent map; each is
checked against a second exact computation (iresnet: the whole map's Jacobian; normflows: its own
eval-mode log-det, exact in 2-D).

    python benchmarks/quality_per_wallclock.py [--seconds 180] [--datasets 8gaussians checkerboard]
        [--compile] [--lr 1e-3] [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import normflows as nf
import numpy as np
import torch
from common import parse_args, print_notes, versions
from torch import Tensor, nn
from toy_flow_vs_normflows import (
    BATCH,
    CONVERGE_ITERATIONS,
    DIM,
    GEOM_P,
    N_EXACT,
    POWER_ITERATIONS,
    SEED,
    build_iresnet,
    build_normflows,
    copy_weights,
    nf_map,
)

import iresnet
from iresnet.data import sample_toy, toy_entropy
from iresnet.models import DensityModel

DATASETS = ("8gaussians", "checkerboard")
N_TEST, TEST_SEED, EVAL_BATCH = 20_000, SEED + 1, 5_000
SLOW_STEP = 10  # a step over SLOW_STEP times the typical one is counted as compile warm-up


@dataclass
class Contender:
    """A model in training: ``loss(x)`` is the batch's mean NLL, ``after_step`` runs after each
    optimiser step, ``log_prob(x)`` is the exact test log-likelihood (call after ``prepare_eval``)
    and ``check(x)`` the same by a second exact computation."""

    model: nn.Module
    loss: Callable[[Tensor], Tensor]
    after_step: Callable[[], None]
    prepare_eval: Callable[[], None]
    log_prob: Callable[[Tensor], Tensor]
    check: Callable[[Tensor], Tensor]
    compiled: bool = False


@dataclass
class Result:
    steps: int
    warmup: float | None
    nll: Tensor
    check: float


def gaussian_log_prob(z: Tensor) -> Tensor:
    """The standard normal log-density per row."""
    return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def jacobian_log_prob(latent: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """log p(x) of a flow with data-to-latent map ``latent`` (per sample, standard normal prior)
    from the exact Jacobian of the whole map: one backward pass per dimension."""
    jacobian = torch.autograd.functional.jacobian(lambda v: latent(v).sum(0), x)  # (d, batch, d)
    logdet = torch.linalg.slogdet(jacobian.transpose(0, 1)).logabsdet
    return gaussian_log_prob(latent(x).detach()) + logdet


def nf_latent(model: nf.NormalizingFlow, x: Tensor) -> Tensor:
    """normflows' data -> latent map, differentiable (``nf_map`` without its ``no_grad``)."""
    for f in model.flows[::-1]:
        x = f.iresblock.forward(x) if isinstance(f, nf.flows.Residual) else f.inverse(x)[0]
    return x


def ir_latent(model: iresnet.Sequential, x: Tensor) -> Tensor:
    """iresnet's data -> latent map without log-det; call in eval mode."""
    for layer in model:
        x = x + layer.g(x) if isinstance(layer, iresnet.ResidualBlock) else layer(x)[0]
    return x


def initial_normflows(name: str) -> nf.NormalizingFlow:
    """normflows' flow from seed 0, its ActNorms initialised on the first training batch."""
    torch.manual_seed(SEED)
    model = build_normflows()
    nf_map(model, sample_toy(name, BATCH, torch.Generator().manual_seed(SEED)))
    return model


def set_logdet(model: iresnet.Sequential, estimator: Callable[[], iresnet.LogDetEstimator]) -> None:
    for layer in model:
        if isinstance(layer, iresnet.ResidualBlock):
            layer.logdet = estimator()


def iresnet_contender(start: nf.NormalizingFlow, compiled: bool, device: str) -> Contender:
    """A copy of ``start`` in iresnet with the Roulette estimator, eager or compiled."""
    model = build_iresnet(np.random.RandomState(SEED), [])
    copy_weights(start, model)
    set_logdet(model, lambda: iresnet.Roulette(n_exact_terms=N_EXACT, p=GEOM_P, memory_efficient=True))
    model.to(device)
    if compiled:  # the ActNorms are initialised already: this fixes the shapes and flags the graph reads
        iresnet.initialize_from_data(model, torch.zeros(BATCH, DIM, device=device))
    forward = torch.compile(model) if compiled else model

    def loss(x: Tensor) -> Tensor:
        z, logdet = forward(x)
        return -(gaussian_log_prob(z) + logdet).mean()

    def prepare_eval() -> None:
        model.eval()
        iresnet.converge_spectral_norms(model)
        set_logdet(model, iresnet.Exact)

    density = DensityModel(model, (DIM,)).to(device)
    return Contender(
        model,
        loss,
        after_step=lambda: None,
        prepare_eval=prepare_eval,
        log_prob=density,
        check=lambda x: jacobian_log_prob(lambda v: ir_latent(model, v), x),
        compiled=compiled,
    )


def normflows_contender(start: nf.NormalizingFlow, device: str) -> Contender:
    """``start`` itself; eval mode makes its Residual flows compute their 2-D log-dets exactly."""
    model = start.to(device)

    def prepare_eval() -> None:
        model.eval()
        nf.utils.update_lipschitz(model, CONVERGE_ITERATIONS)

    return Contender(
        model,
        model.forward_kld,
        after_step=lambda: nf.utils.update_lipschitz(model, POWER_ITERATIONS),
        prepare_eval=prepare_eval,
        log_prob=lambda x: jacobian_log_prob(lambda v: nf_latent(model, v), x),
        check=model.log_prob,
    )


def train(contender: Contender, name: str, seconds: float, lr: float, device: str) -> list[float]:
    """Adam steps on fresh batches until ``seconds`` have passed; the seconds of each step."""
    torch.manual_seed(SEED), np.random.seed(SEED)  # the probes; normflows' tail lengths
    data = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(contender.model.parameters(), lr)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    contender.model.train()
    times: list[float] = []
    while sum(times) < seconds:
        start = time.perf_counter()
        x = sample_toy(name, BATCH, data).to(device)
        opt.zero_grad(set_to_none=True)
        contender.loss(x).backward()
        opt.step()
        contender.after_step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def compile_warmup(times: list[float]) -> float:
    """The excess over the typical step (the median after the first) of the slow steps:
    compilation at the first call and any recompilation."""
    typical = statistics.median(times[1:]) if len(times) > 1 else 0.0
    return sum(t - typical for t in times if t > SLOW_STEP * typical)


def evaluate(contender: Contender, x: Tensor) -> tuple[Tensor, float]:
    """The test NLL per point and the largest difference to the second exact computation."""
    contender.prepare_eval()
    log_p, check = [], []
    for batch in x.split(EVAL_BATCH):
        log_p.append(contender.log_prob(batch).detach())
        check.append(contender.check(batch).detach())
    log_p = torch.cat(log_p)
    return -log_p, (log_p - torch.cat(check)).abs().max().item()


def run(contender: Contender, name: str, test: Tensor, args: argparse.Namespace) -> Result:
    times = train(contender, name, args.seconds, args.lr, args.device)
    nll, check = evaluate(contender, test)
    return Result(len(times), compile_warmup(times) if contender.compiled else None, nll, check)


def run_dataset(name: str, args: argparse.Namespace) -> dict[str, Result]:
    """Every contender trained and evaluated on ``name``; built before any trains."""
    start = initial_normflows(name)
    contenders = {"iresnet": iresnet_contender(start, False, args.device)}
    if args.compile:
        contenders["iresnet compiled"] = iresnet_contender(start, True, args.device)
    contenders["normflows"] = normflows_contender(start, args.device)
    test = sample_toy(name, N_TEST, torch.Generator().manual_seed(TEST_SEED)).to(args.device)
    return {label: run(c, name, test, args) for label, c in contenders.items()}


def report(results: dict[str, dict[str, Result]], entropies: dict[str, float], args: argparse.Namespace) -> None:
    print(versions(args.device) + "\n")
    columns = ["data set", "contender", "steps in the budget", "compile warm-up (s)", "test NLL (nats) ± s.e."]
    print(f"| {' | '.join(columns)} | NLL − true entropy |\n|{'---|' * (len(columns) + 1)}")
    for name, by_contender in results.items():
        for label, r in by_contender.items():
            warmup = "" if r.warmup is None else f"{r.warmup:.1f}"
            nll = f"{r.nll.mean():.4f} ± {r.nll.std() / math.sqrt(len(r.nll)):.4f}"
            print(f"| {name} | {label} | {r.steps} | {warmup} | {nll} | {r.nll.mean() - entropies[name]:+.4f} |")
    checks = "; ".join(f"{name} {label} {r.check:.1e}" for name, d in results.items() for label, r in d.items())
    print_notes(
        [
            f"budget {args.seconds:g} s of wall-clock per contender, batch {BATCH}, Adam lr {args.lr:g}, fresh "
            f"batches from one seeded generator (the same for all); all start from the same weights "
            f"(normflows' initialisation, copied into iresnet)",
            f"estimator in both (normflows' Residual defaults, as its residual-flow example uses them): "
            f"Roulette, {N_EXACT} exact terms, geometric({GEOM_P}) tail, 1 Hutchinson probe, Neumann gradient "
            f"in the forward pass (normflows reduce_memory=True, iresnet memory_efficient=True); "
            f"{POWER_ITERATIONS} power iterations per step (iresnet in the forward pass, normflows "
            f"update_lipschitz after each step)",
            "true entropies H (nats): "
            + ", ".join(f"{name} {h:.3f}" for name, h in entropies.items())
            + " (8gaussians by Monte Carlo with its exact density, s.e. about 1e-3)",
            f"test: {N_TEST:,} fresh points, the same for all; eval mode with converged spectral norms "
            f"(iresnet converge_spectral_norms, normflows update_lipschitz({CONVERGE_ITERATIONS})); exact "
            f"log-det: iresnet's Exact estimator, normflows by the Jacobian of its whole data-to-latent map",
            "max abs(log p) difference to a second exact computation (iresnet: the whole map's Jacobian; "
            f"normflows: its own eval-mode log-det, brute force in 2-D): {checks}",
            f"compile warm-up: the excess over the median step of the steps over {SLOW_STEP}x it, inside the budget",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=180, help="wall-clock training budget per contender")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--compile", action="store_true", help="add iresnet under torch.compile as a contender")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    args = parse_args(p)
    entropies = {name: toy_entropy(name) for name in args.datasets}
    report({name: run_dataset(name, args) for name in args.datasets}, entropies, args)


if __name__ == "__main__":
    main()
