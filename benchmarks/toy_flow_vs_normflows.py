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
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

import normflows as nf
import numpy as np
import torch
from torch import Tensor, nn

import iresnet
from iresnet.memory import SavedTensorMeter

BLOCKS, DIM, HIDDEN, COEFF, N_EXACT, GEOM_P, POWER_ITERATIONS = 16, 2, 128, 0.9, 2, 0.5, 5
BATCH, WARMUP, LR, SEED, PRETRAIN_STEPS, PRETRAIN_LR = 512, 3, 1e-3, 0, 400, 3e-3
N_INVERT, TOL, MAX_ITER, ROUNDS = 10_000, 1e-5, 1000, 5  # normflows caps its loop at 1000 iterations
CONVERGE_ITERATIONS = 2000  # normflows' own 200 left a sigma 0.6 % low, a different function from iresnet's
MIB, LIBRARIES = 2**20, ("iresnet", "normflows")


def retain_freed_memory() -> None:
    """Let glibc keep freed memory: otherwise every 5 MB temporary is page-faulted in afresh, and that
    kernel time moved the ratios by up to 0.25 between runs."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 * MIB)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


class NumpyRoulette(iresnet.Roulette):
    """Roulette drawing its tail length as normflows does (numpy's legacy generator); logs the draws."""

    def __init__(self, rng: np.random.RandomState, draws: list[int]) -> None:
        super().__init__(n_exact_terms=N_EXACT, p=GEOM_P, n_samples=1, memory_efficient=True)
        self.rng, self.draws = rng, draws

    def draw_tail_length(self) -> int:
        self.draws.append(int(self.rng.geometric(self.p, 1)[0]))
        return self.draws[-1]


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
        block = iresnet.ResidualBlock(g, NumpyRoulette(rng, draws), atol=TOL, rtol=TOL, max_iter=MAX_ITER)
        layers += [iresnet.ActNorm(DIM), block]
    return iresnet.Sequential(*layers)


@torch.no_grad()
def copy_weights(nf_model: nf.NormalizingFlow, ir_model: iresnet.Sequential) -> None:
    """normflows' ActNorm maps data by ``(x - t) e^-s``, iresnet's by ``(x + b) e^s``; normflows keeps
    the power-iteration vector ``u`` in the output space, iresnet ``v``. Both Swish betas are softplus'd."""
    for nf_layer, ir_layer in zip(nf_model.flows[::-1], ir_model, strict=True):  # data -> latent
        if isinstance(ir_layer, iresnet.ActNorm):
            ir_layer.log_scale.copy_(-nf_layer.s.view(-1))
            ir_layer.bias.copy_(-nf_layer.t.view(-1))
            ir_layer.initialized.fill_(True)
            continue
        for nf_mod, ir_mod in zip(nf_layer.iresblock.nnet.net, ir_layer.g, strict=True):
            if isinstance(ir_mod, iresnet.LipSwish):
                ir_mod.raw_beta.copy_(nf_mod.beta.view(()))
                continue
            ir_mod.parametrizations.weight.original.copy_(nf_mod.weight)
            ir_mod.bias.copy_(nf_mod.bias)
            ir_mod.parametrizations.weight[0].u.copy_(nf_mod.v)
            ir_mod.parametrizations.weight[0].v.copy_(nf_mod.u)


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


class Pair:
    """Both models with identical functions, their optimisers and the training batch."""

    def __init__(self, device: str) -> None:
        torch.manual_seed(SEED)  # the batch: 8 Gaussians (std 0.2) on the circle of radius 2
        angle = 2 * math.pi * torch.randint(0, 8, (BATCH,)) / 8
        self.x = 2 * torch.stack([angle.cos(), angle.sin()], 1) + 0.2 * torch.randn(BATCH, DIM)
        self.nf = build_normflows()
        nf_map(self.nf, self.x)  # normflows' data-dependent ActNorm initialisation
        self.rng, self.draws = np.random.RandomState(SEED), []
        self.ir = build_iresnet(self.rng, self.draws).eval()
        copy_weights(self.nf, self.ir)
        self.differences = [self.difference()]
        self.ir.train()
        np.random.seed(SEED)
        self.x, self.nf, self.ir = self.x.to(device), self.nf.to(device), self.ir.to(device)
        self.opt = {"iresnet": torch.optim.Adam(self.ir.parameters(), LR)}
        self.opt["normflows"] = torch.optim.Adam(self.nf.parameters(), LR)

    def difference(self) -> float:
        """max abs(z_iresnet - z_normflows) on the batch."""
        return (ir_map(self.ir, self.x) - nf_map(self.nf, self.x)).abs().max().item()

    def step(self, library: str, opt: torch.optim.Optimizer | None = None) -> float:
        opt = opt or self.opt[library]
        opt.zero_grad(set_to_none=True)
        if library == "iresnet":
            z, logdet = self.ir(self.x)
            loss = (0.5 * z.pow(2).sum(1) + 0.5 * DIM * math.log(2 * math.pi) - logdet).mean()
        else:
            loss = self.nf.forward_kld(self.x)
        loss.backward()
        opt.step()
        if library == "normflows":
            nf.utils.update_lipschitz(self.nf, POWER_ITERATIONS)
        return loss.item()


def timed(fn, device: str) -> tuple[float, object]:
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of ``a[i] / b[i]``: pairs run back to back share the machine's speed of the moment."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def time_training(pair: Pair, steps: int, device: str) -> tuple[dict, dict, bool]:
    """Interleaved steps: the times, the last losses and whether the tail draws always matched."""
    times, losses, draws_match = {k: [] for k in LIBRARIES}, {}, True
    for i in range(WARMUP + steps):
        before = len(pair.draws)
        for library in LIBRARIES:
            seconds, losses[library] = timed(lambda library=library: pair.step(library), device)
            if i >= WARMUP:
                times[library].append(seconds)
        nf_draws = [int(f.iresblock.last_n_samples[0]) for f in pair.nf.flows[::-1] if hasattr(f, "iresblock")]
        draws_match &= pair.draws[before:] == nf_draws
    return times, losses, draws_match


def step_memory(pair: Pair, library: str, device: str) -> tuple[int, int]:
    """Peak bytes of the autograd graph in a step and, on CUDA, the allocator's peak increase."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    with SavedTensorMeter() as meter:
        pair.step(library)
    return meter.peak, torch.cuda.max_memory_allocated() - before if device == "cuda" else 0


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
def invert_iresnet(ir_model: iresnet.Sequential, z: Tensor, method: str) -> tuple[Tensor, int, int]:
    """x, the evaluations of g and the rows through g (summed over blocks)."""
    blocks = [b for b in ir_model if isinstance(b, iresnet.ResidualBlock)]
    for b in blocks:
        b.inverse_method = method
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


def time_inversion(pair: Pair, device: str) -> tuple[Tensor, dict, dict]:
    """Interleaved rounds after a warm-up: the seconds and the last results of each solver."""
    z = torch.randn(N_INVERT, DIM, generator=torch.Generator().manual_seed(SEED + 1)).to(device)
    runs = {"anderson": lambda v: invert_iresnet(pair.ir, v, "anderson")}
    runs["fixed_point"] = lambda v: invert_iresnet(pair.ir, v, "fixed_point")
    runs["normflows"] = lambda v: invert_normflows(pair.nf, v)
    seconds, results = {k: [] for k in runs}, {k: run(z[:1000]) for k, run in runs.items()}
    for _ in range(ROUNDS):
        for k, run in runs.items():
            t, results[k] = timed(lambda run=run: run(z), device)
            seconds[k].append(t)
    return z, seconds, results


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


def row(label: str, ir: str, nf_: str, ratio: float | None = None, target: str = "") -> None:
    print(f"| {label} | {ir} | {nf_} | {'' if ratio is None else f'{ratio:.2f}'} | {target} |")


def report(pair: Pair, training: tuple, memory: dict[str, dict], inversion: tuple, bounds: list[float]) -> None:
    (times, losses, draws_match), (z, seconds, results) = training, inversion
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=sys.path[0])
    print(f"torch {torch.__version__}, normflows {nf.__version__}, iresnet {commit.stdout.strip()}, ", end="")
    print(f"device {pair.x.device}, {torch.get_num_threads()} threads\n")
    print("| measurement | iresnet | normflows | ratio | target |\n|---|---|---|---|---|")
    ms = [f"{1e3 * statistics.median(v):.1f}" for v in times.values()]
    row(f"training step, median of {len(times['iresnet'])} (ms)", *ms, paired_ratio(*times.values()), "<= 0.5")
    for label, m in memory.items():
        row(f"{label} (MiB)", *(f"{v / MIB:.2f}" for v in m.values()), m["iresnet"] / m["normflows"], "<= 1")
    for method, target in (("anderson", "<= 0.5"), ("fixed_point", "")):
        s = [seconds[method], seconds["normflows"]]
        label = f"invert {N_INVERT:,} to {TOL:g}, iresnet {method} (s)"
        row(label, *(f"{statistics.median(v):.3f}" for v in s), paired_ratio(*s), target)
    a, f, n = results.values()
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
    print("\n" + "\n".join(f"- {note}" for note in notes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (default 20)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--profile", action="store_true", help="profile the inversions and training steps at the end")
    p.add_argument("--rss-worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_worker:
        return rss_worker(args.rss_worker)
    retain_freed_memory()
    pair = Pair(args.device)
    training = time_training(pair, args.steps, args.device)
    peaks = {k: step_memory(pair, k, args.device) for k in LIBRARIES}
    memory = {"autograd saved tensors (parameters included), peak in a step": {k: v[0] for k, v in peaks.items()}}
    if args.device == "cpu":
        memory["peak RSS increase in a step, fresh process"] = {k: rss_peak(k, args.threads) for k in LIBRARIES}
    else:
        memory["CUDA max_memory_allocated increase in a step"] = {k: v[1] for k, v in peaks.items()}
    bounds = prepare_inversion(pair)
    inversion = time_inversion(pair, args.device)
    report(pair, training, memory, inversion, bounds)
    if args.profile:
        profile(pair, inversion[0])


if __name__ == "__main__":
    main()
