"""Benchmark: the same toy 2-D residual flow in iresnet and in normflows.

16 x [ActNorm, residual block], branch ``Swish, Linear(2,128), Swish, Linear(128,128), Swish,
Linear(128,2)`` with spectral-norm coefficient 0.9, Roulette log-det (2 exact terms, geometric(0.5)
tail, 1 Hutchinson probe, Neumann gradient in the forward pass), batch 512. For a fair comparison
normflows' weights, Swish betas, ActNorm parameters and power-iteration vectors are copied into
iresnet (the two maps are compared); iresnet draws its tail lengths from numpy like normflows (the
draws are compared); both run 5 power iterations per step; the inversion uses a model pre-trained
for 400 untimed steps, in eval mode with converged spectral norms.

    python benchmarks/toy_flow_vs_normflows.py [--device cuda] [--steps 20] [--threads 1] [--profile]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
from functools import partial

import normflows as nf
import numpy as np
import torch
from common import (
    COMPILED,
    LIBRARIES,
    MIB,
    FlowPair,
    NumpyRoulette,
    benchmark_parser,
    copy_layer,
    paired_ratio,
    parse_args,
    print_notes,
    retain_freed_memory,
    row,
    step_memory,
    time_training,
    timed,
    versions,
)
from torch import Tensor, nn

import iresnet

BLOCKS, DIM, HIDDEN, COEFF, N_EXACT, GEOM_P, POWER_ITERATIONS = 16, 2, 128, 0.9, 2, 0.5, 5
BATCH, WARMUP, LR, SEED, PRETRAIN_STEPS, PRETRAIN_LR = 512, 3, 1e-3, 0, 400, 3e-3
N_INVERT, TOL, MAX_ITER, ROUNDS = 10_000, 1e-5, 1000, 5  # normflows caps its loop at 1000 iterations
CONVERGE_ITERATIONS = 2000  # normflows' own 200 left a sigma 0.6 % low, a different function from iresnet's


def build_normflows() -> nf.NormalizingFlow:
    flows: list[nn.Module] = []
    for _ in range(BLOCKS):
        net = nf.nets.LipschitzMLP([DIM, HIDDEN, HIDDEN, DIM], COEFF, max_lipschitz_iter=POWER_ITERATIONS)
        flows.append(nf.flows.Residual(net, reduce_memory=True, n_exact_terms=N_EXACT, geom_p=GEOM_P, n_samples=1))
        flows.append(nf.flows.ActNorm(DIM))
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(DIM, trainable=False), flows)


def build_iresnet(rng: np.random.RandomState, draws: list[int]) -> iresnet.Sequential:
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        g = nn.Sequential()
        for fan_in, fan_out in [(DIM, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, DIM)]:
            g.extend([iresnet.LipSwish(), iresnet.spectral_norm(nn.Linear(fan_in, fan_out), COEFF, POWER_ITERATIONS)])
        logdet = NumpyRoulette(rng, draws, N_EXACT, GEOM_P)
        layers += [iresnet.ActNorm(DIM), iresnet.ResidualBlock(g, logdet, atol=TOL, rtol=TOL, max_iter=MAX_ITER)]
    return iresnet.Sequential(*layers)


def copy_vectors(nf_mod: nn.Module, ir_mod: nn.Module) -> None:
    """normflows keeps the power-iteration vector ``u`` in the output space, iresnet ``v``."""
    ir_mod.parametrizations.weight[0].u.copy_(nf_mod.v)
    ir_mod.parametrizations.weight[0].v.copy_(nf_mod.u)


def copy_weights(nf_model: nf.NormalizingFlow, ir_model: iresnet.Sequential) -> None:
    """normflows' layers, in data -> latent order, into iresnet's (``common.copy_layer``)."""
    for nf_layer, ir_layer in zip(nf_model.flows[::-1], ir_model, strict=True):
        copy_layer(nf_layer, ir_layer, copy_vectors)


@torch.no_grad()
def nf_map(nf_model: nf.NormalizingFlow, x: Tensor) -> Tensor:
    """Data -> latent without log-det (the first call initialises normflows' ActNorms)."""
    for f in nf_model.flows[::-1]:
        x = f.iresblock.forward(x) if isinstance(f, nf.flows.Residual) else f.inverse(x)[0]
    return x


@torch.no_grad()
def ir_map(ir_model: iresnet.Sequential, x: Tensor) -> Tensor:
    """Data -> latent without log-det; call it in eval mode (training mode runs power iterations)."""
    for layer in ir_model:
        x = x + layer.g(x) if isinstance(layer, iresnet.ResidualBlock) else layer(x)[0]
    return x


class Pair(FlowPair):
    """Both models with identical functions, their optimisers and the training batch."""

    power_iterations = POWER_ITERATIONS

    def __init__(self, device: str, compile: bool = False, bf16: bool = False) -> None:
        torch.manual_seed(SEED)  # the batch: 8 Gaussians (std 0.2) on the circle of radius 2
        angle = 2 * math.pi * torch.randint(0, 8, (BATCH,)) / 8
        self.x = 2 * torch.stack([angle.cos(), angle.sin()], 1) + 0.2 * torch.randn(BATCH, DIM)
        self.nf = build_normflows()
        nf_map(self.nf, self.x)  # normflows' data-dependent ActNorm initialisation
        self.rng, self.draws = np.random.RandomState(SEED), []
        self.ir = build_iresnet(self.rng, self.draws).eval()
        copy_weights(self.nf, self.ir)
        self.differences = [self.difference()]
        np.random.seed(SEED)
        self.to_training(device, LR, compile, bf16)

    def difference(self) -> float:
        """max abs(z_iresnet - z_normflows) on the batch."""
        return (ir_map(self.ir, self.x) - nf_map(self.nf, self.x)).abs().max().item()

    def nf_draws(self) -> list[int]:
        """normflows' tail lengths of its last step, in iresnet's block order."""
        return [int(f.iresblock.last_n_samples[0]) for f in self.nf.flows[::-1] if hasattr(f, "iresblock")]


def proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def rss_worker(library: str) -> None:
    """In a fresh process: the peak RSS increase (bytes) of 3 steps after the warm-up."""
    pair, peaks = Pair("cpu"), []
    for i in range(WARMUP + 3):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM
        before = proc_status_kib("VmRSS")
        pair.step(library)
        if i >= WARMUP:
            peaks.append(1024 * (proc_status_kib("VmHWM") - before))
    print(json.dumps(max(peaks)))


def rss_peak(library: str, threads: int | None) -> int:
    """``rss_worker`` in a subprocess whose glibc returns freed memory at once, so RSS follows live memory."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--rss-worker", library, *(["--threads", str(threads)] if threads else [])]
    return json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)


def prepare_inversion(pair: Pair) -> list[float]:
    """Pre-train normflows, copy it into iresnet, eval mode, converged spectral norms in both.
    Returns iresnet's certified Lip(g) per block."""
    opt = torch.optim.Adam(pair.nf.parameters(), PRETRAIN_LR)
    for _ in range(PRETRAIN_STEPS):
        pair.step("normflows", opt)
    pair.nf.eval(), pair.ir.eval()
    nf.utils.update_lipschitz(pair.nf, CONVERGE_ITERATIONS)
    copy_weights(pair.nf, pair.ir)
    iresnet.converge_spectral_norms(pair.ir)
    pair.differences.append(pair.difference())
    return [iresnet.lipschitz_bound(b.g, (DIM,)) for b in pair.ir if isinstance(b, iresnet.ResidualBlock)]


@torch.no_grad()
def invert_iresnet(ir_model: iresnet.Sequential, z: Tensor, method: str, compiled: bool = False) -> tuple:
    """x, the evaluations of g and the rows through g (summed over blocks); ``compiled``: g through
    one compiled function for all blocks (``compile_inverse``)."""
    blocks = [b for b in ir_model if isinstance(b, iresnet.ResidualBlock)]
    for b in blocks:
        b.inverse_method, b.compile_inverse = method, compiled
    x = ir_model.inverse(z)
    reports = [b.last_inversion for b in blocks]
    return x, sum(r.evaluations for r in reports), sum(r.sample_evaluations for r in reports)


@torch.no_grad()
def invert_normflows(nf_model: nf.NormalizingFlow, z: Tensor) -> tuple[Tensor, int, int]:
    """normflows stops when every (dx)^2 < atol + rtol abs(y), so atol = rtol = TOL^2 is its TOL."""
    calls: list[int] = []
    residuals = [f.iresblock for f in nf_model.flows if isinstance(f, nf.flows.Residual)]
    hooks = [r.nnet.register_forward_hook(lambda *_: calls.append(1)) for r in residuals]
    for f in nf_model.flows:
        z = f.iresblock._inverse_fixed_point(z, TOL**2, TOL**2) if isinstance(f, nf.flows.Residual) else f(z)[0]
    for h in hooks:
        h.remove()
    return z, len(calls), len(calls) * len(z)


def time_inversion(pair: Pair, device: str, compiled: bool) -> tuple[Tensor, dict, dict, float | None]:
    """Interleaved rounds after a warm-up: the seconds and the last results of each solver, and the
    compiled inverse's warm-up (its first call, untimed in the rounds)."""
    z = torch.randn(N_INVERT, DIM, generator=torch.Generator().manual_seed(SEED + 1)).to(device)
    runs = {"anderson": lambda v: invert_iresnet(pair.ir, v, "anderson")}
    runs["fixed_point"] = lambda v: invert_iresnet(pair.ir, v, "fixed_point")
    runs["normflows"] = lambda v: invert_normflows(pair.nf, v)
    warmup = None
    if compiled:
        runs["anderson, compiled g"] = lambda v: invert_iresnet(pair.ir, v, "anderson", compiled=True)
        runs["fixed_point, compiled g"] = lambda v: invert_iresnet(pair.ir, v, "fixed_point", compiled=True)
        warmup = timed(lambda: runs["fixed_point, compiled g"](z[:1000]), device)[0]
    seconds, results = {k: [] for k in runs}, {k: run(z[:1000]) for k, run in runs.items()}
    for _ in range(ROUNDS):
        for k, run in runs.items():
            t, results[k] = timed(lambda run=run: run(z), device)
            seconds[k].append(t)
    return z, seconds, results, warmup


def profile(pair: Pair, z: Tensor) -> None:
    """torch.profiler (self CPU) of the inversions and training steps, cProfile (cumulative) of iresnet's."""
    import cProfile
    import pstats

    from torch.profiler import profile as torch_profile

    jobs = {"iresnet Anderson inversion": lambda: invert_iresnet(pair.ir, z, "anderson")}
    jobs["normflows inversion"] = lambda: invert_normflows(pair.nf, z)
    jobs["iresnet training step x3"] = lambda: [pair.step("iresnet") for _ in range(3)]
    jobs["normflows training step x3"] = lambda: [pair.step("normflows") for _ in range(3)]
    for name, job in jobs.items():
        pair.ir.train("step" in name), pair.nf.train("step" in name)
        job()  # warm-up
        np.random.seed(SEED), pair.rng.seed(SEED)  # the same tail lengths in both libraries
        with torch_profile() as prof:
            job()
        print(f"\n### {name}: torch.profiler\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        if name.startswith("iresnet"):
            python_profile = cProfile.Profile()
            python_profile.runcall(job)
            print(f"\n### {name}: cProfile\n")
            pstats.Stats(python_profile).sort_stats("cumulative").print_stats(20)


def report(
    pair: Pair, training: tuple, memory: dict[str, dict], inversion: tuple, bounds: list[float], warmup: float | None
) -> None:
    (times, losses, draws_match), (z, seconds, results, inverse_warmup) = training, inversion
    print(versions(str(pair.x.device)) + ("; iresnet in bf16 autocast" if pair.bf16 else "") + "\n")
    print("| measurement | iresnet | normflows | ratio | target |\n|---|---|---|---|---|")
    targets = {"iresnet": "<= 1.0", COMPILED: "<= 0.6"}
    for library in (k for k in times if k != "normflows"):
        pair_times = [times[library], times["normflows"]]
        label = f"training step{', compiled' if library == COMPILED else ''}, median of {len(times[library])} (ms)"
        ms = [f"{1e3 * statistics.median(v):.1f}" for v in pair_times]
        row(label, *ms, paired_ratio(*pair_times), targets[library])
    if warmup is not None:
        row("compile warm-up: the first compiled step (s)", f"{warmup:.1f}", "", None, "")
    for label, m in memory.items():
        for library in (k for k in m if k != "normflows"):
            name = f"{label}{', compiled' if library == COMPILED else ''} (MiB)"
            row(name, f"{m[library] / MIB:.2f}", f"{m['normflows'] / MIB:.2f}", m[library] / m["normflows"], "<= 1")
    for method in (k for k in seconds if k != "normflows"):
        s = [seconds[method], seconds["normflows"]]
        label = f"invert {N_INVERT:,} to {TOL:g}, iresnet {method} (s)"
        row(label, *(f"{statistics.median(v):.3f}" for v in s), paired_ratio(*s), "<= 0.5")
    if inverse_warmup is not None:
        row("compiled inverse warm-up: its first call, on 1,000 points (s)", f"{inverse_warmup:.1f}", "", None, "")
    a, f, n = results["anderson"], results["fixed_point"], results["normflows"]
    row("g evaluations: iresnet anderson / fixed_point", f"{a[1]} / {f[1]}", f"{n[1]}", a[1] / n[1])
    row("rows through g: iresnet anderson / fixed_point", f"{a[2]:,} / {f[2]:,}", f"{n[2]:,}", a[2] / n[2])
    err = [(ir_map(pair.ir, a[0]) - z).abs().max(), (ir_map(pair.ir, f[0]) - z).abs().max()]
    err.append((nf_map(pair.nf, n[0]) - z).abs().max())
    row("max abs(f(x) - z) after inversion: anderson / fixed_point", f"{err[0]:.1e} / {err[1]:.1e}", f"{err[2]:.1e}")
    notes = [
        "time ratios are medians of back-to-back ratios; step min / max (ms): "
        + ", ".join(f"{k} {1e3 * min(v):.1f} / {1e3 * max(v):.1f}" for k, v in times.items()),
        f"same function: max abs(z_iresnet - z_normflows) {pair.differences[0]:.1e} at the start, "
        f"{pair.differences[1]:.1e} on the inversion model; same tail draws at every step: {draws_match}; "
        f"last losses {losses['iresnet']:.4f} / {losses['normflows']:.4f} (the Hutchinson probes differ)",
        f"inversion model: {PRETRAIN_STEPS} untimed normflows steps (Adam lr {PRETRAIN_LR}), certified Lip(g) "
        f"{min(bounds):.3f} to {max(bounds):.3f}; rounds (s): "
        + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in seconds.items()),
        f"tolerance: iresnet atol = rtol = {TOL:g}, abs(dx) <= {TOL:g} (1 + abs(x)); normflows squares its step, "
        f"so it is called with atol = rtol = {TOL**2:g}: abs(dx) < {TOL:g} sqrt(1 + abs(y)); "
        f"max abs(x_anderson - x_normflows) {(a[0] - n[0]).abs().max().item():.1e}",
    ]
    if COMPILED in times:
        notes.append(
            "the compiled contender draws its tail lengths on the device (no host sync), not from normflows' "
            "numpy stream: its steps do the same work on average, not step by step"
        )
    print_notes(notes)


def main() -> None:
    p = benchmark_parser(__doc__, 20, "timed training steps (default 20)")
    p.add_argument("--profile", action="store_true", help="profile the inversions and training steps at the end")
    p.add_argument("--rss-worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parse_args(p)
    if args.rss_worker:
        return rss_worker(args.rss_worker)
    retain_freed_memory()
    pair = Pair(args.device, args.compile, args.precision == "bf16")
    steps = {k: partial(pair.step, k) for k in (*LIBRARIES, *[COMPILED] * args.compile)}
    warmup = timed(steps[COMPILED], args.device)[0] if args.compile else None
    training = time_training(steps, args.steps, WARMUP, args.device, pair.draws, pair.nf_draws)
    peaks = {k: step_memory(step, args.device) for k, step in steps.items()}
    memory = {"autograd saved tensors (parameters included), peak in a step": {k: v[0] for k, v in peaks.items()}}
    if args.device == "cpu":
        memory["peak RSS increase in a step, fresh process"] = {k: rss_peak(k, args.threads) for k in LIBRARIES}
    else:
        memory["CUDA max_memory_allocated increase in a step"] = {k: v[1] for k, v in peaks.items()}
    bounds = prepare_inversion(pair)
    inversion = time_inversion(pair, args.device, args.compile)
    report(pair, training, memory, inversion, bounds, warmup)
    if args.profile:
        profile(pair, inversion[0])


if __name__ == "__main__":
    main()
