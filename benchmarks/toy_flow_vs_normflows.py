r"""Benchmark: the same toy 2-D residual flow in ``iresnet`` and in ``normflows``.

What is built (identically in both libraries)
---------------------------------------------
* 16 residual blocks, with an ActNorm before each of them in the data -> latent direction
  (``iresnet.ActNorm`` / ``nf.flows.ActNorm``).
* Every residual branch is normflows' ``LipschitzMLP([2, 128, 128, 2], lipschitz_const=0.9)``
  layout: ``Swish, Linear(2,128), Swish, Linear(128,128), Swish, Linear(128,2)``, i.e. the
  activation comes *before* each spectrally normalised linear layer (coefficient 0.9). The
  iresnet branch is ``nn.Sequential(LipSwish(), spectral_norm(Linear(2,128), 0.9), LipSwish(),
  ...)`` in the same order. After construction every weight, bias, Swish beta and
  power-iteration vector of the normflows model is copied into the iresnet model, so both start
  from the same function (``--init-zeros`` selects normflows' ``init_zeros`` option, which
  shrinks the last layer by 1000; it is off by default so that inversion is not trivial).
* Log-determinant: Roulette (unbiased Russian-roulette power series) with 2 exact terms, a
  geometric(0.5) tail and one Gaussian Hutchinson probe per sample;
  ``iresnet.Roulette(n_exact_terms=2, p=0.5, n_samples=1, memory_efficient=True)`` against
  ``nf.flows.Residual(net, reduce_memory=True, n_exact_terms=2, geom_p=0.5, n_samples=1)``.
  Both then use the Neumann-series gradient computed in the forward pass
  (``--no-memory-efficient`` compares ``memory_efficient=False`` with ``reduce_memory=False``).
  The tail length N is random. So that both libraries evaluate the same number of series terms
  in the same block at the same step, the iresnet estimator here draws N from a numpy
  ``RandomState`` (the legacy generator normflows uses) seeded like ``np.random``; the draws
  are compared after the run and reported.
* Direction: normflows' ``Residual(reverse=True)`` (its default) applies ``x + g(x)`` in
  ``inverse``, which ``NormalizingFlow.forward_kld`` uses on data, and the fixed-point inverse in
  ``forward`` (sampling). iresnet's ``ResidualBlock.forward`` is ``x + g(x)`` on data and
  ``inverse`` the fixed point. So both do the same work in each direction.
* Loss: negative mean log-likelihood of a fixed batch of 512 points from a mixture of 8
  Gaussians on a circle, standard normal base. Adam, lr 1e-3.

Power iterations
----------------
normflows' ``InducedNormLinear.forward`` runs *no* power iteration
(``compute_weight(update=False)``); its ``max_lipschitz_iter`` only takes effect when the
training loop calls ``nf.utils.update_lipschitz(model, n)``, as normflows' tests and the
Residual Flows code do after each optimiser step. The normflows step here therefore ends with
``update_lipschitz(model, P)`` and the iresnet layers use
``spectral_norm(..., n_power_iterations=P, tolerance=None)``, i.e. exactly P iterations per
training forward (``--power-iterations P``, default 5 = normflows' ``max_lipschitz_iter``
default). ``--iresnet-sn-tolerance`` switches iresnet to its adaptive rule instead.

What is measured
----------------
* Training step: forward + log-det + backward + Adam step (+ the power iterations above),
  median over ``--steps`` steps after ``--warmup`` steps; iresnet and normflows steps are
  interleaved so that drifts of the machine hit both alike.
* Peak memory of a training step. On CPU two numbers:
  (a) RSS: each library runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (so
  glibc returns freed tensors to the OS and RSS follows live memory); after the warm-up the
  kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), and the peak during a step
  minus the RSS just before it is recorded; the max over ``--memory-steps`` steps is reported.
  This includes temporaries and gradients, not only the graph.
  (b) Saved tensors: ``torch.autograd.graph.saved_tensors_hooks`` track every tensor saved for
  backward, deduplicated by storage, parameters excluded; the peak of the bytes alive at once
  during one step is reported (the memory held by autograd graphs).
  On CUDA: ``torch.cuda.max_memory_allocated`` during a step minus the allocation before it.
* Inversion of 10,000 standard-normal latent points to 1e-5, models in eval mode with identical
  weights (copied again after training) and converged spectral norms
  (``iresnet.converge_spectral_norms`` / ``nf.utils.update_lipschitz(model, 200)``):
  iresnet ``Sequential.inverse`` with every block's ``inverse_method`` set to ``"anderson"`` or
  ``"fixed_point"`` and ``atol = rtol = 1e-5`` (per element: ``|f(x)-x| <= atol + rtol |f(x)|``);
  normflows' ``iResBlock.inverse`` iterates ``x <- y - g(x)`` on the whole batch until
  ``(x - x_prev)**2 / (atol + rtol |y|) < 1`` for all elements, at most 1000 iterations, with
  ``atol = rtol = 1e-5`` hard-wired. Because the step is *squared* there, its default stops at a
  step of about ``sqrt(1e-5) ~ 3e-3``; the "matched" normflows run calls its
  ``_inverse_fixed_point(y, atol=1e-10, rtol=1e-10)``, i.e. a step below ``1e-5 sqrt(1 + |y|)``,
  comparable to iresnet's rule. Ratios use the matched run; the default is shown for reference.

Run ``python benchmarks/toy_flow_vs_normflows.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import normflows as nf
import numpy as np
import torch
from torch import Tensor, nn

import iresnet

DIM = 2
HIDDEN = 128
COEFF = 0.9
N_EXACT_TERMS = 2
GEOM_P = 0.5
NF_MAX_INVERSE_ITER = 1000  # normflows' hard-wired cap in iResBlock._inverse_fixed_point
NF_CONVERGE_ITERATIONS = 200  # what normflows' InducedNormLinear runs at construction


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class Config:
    """Every knob of the benchmark (the command-line options)."""

    blocks: int = 16
    batch: int = 512
    steps: int = 20
    warmup: int = 3
    memory_steps: int = 3
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    device: str = "cpu"
    seed: int = 0
    lr: float = 1e-3
    memory_efficient: bool = True
    power_iterations: int = 5
    iresnet_sn_tolerance: float | None = None
    init_zeros: bool = False
    n_invert: int = 10_000
    inverse_tol: float = 1e-5
    inverse_repeats: int = 3
    skip_inverse: bool = False


def parse_args(argv: list[str] | None = None) -> tuple[Config, str | None]:
    """The configuration and, for the internal memory worker, the library it measures."""
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=d.blocks, help="residual blocks (default 16)")
    p.add_argument("--batch", type=int, default=d.batch, help="training batch size (default 512)")
    p.add_argument("--steps", type=int, default=d.steps, help="timed training steps (median reported)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed training steps first")
    p.add_argument("--memory-steps", type=int, default=d.memory_steps, help="steps measured for peak memory (max reported)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads for both (default: all cores)")
    p.add_argument("--device", default=d.device, help="cpu or cuda[:k]")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--no-memory-efficient", dest="memory_efficient", action="store_false",
                   help="iresnet memory_efficient=False vs normflows reduce_memory=False")
    p.add_argument("--power-iterations", type=int, default=d.power_iterations,
                   help="power iterations per training step in both (default 5)")
    p.add_argument("--iresnet-sn-tolerance", type=float, default=None,
                   help="use iresnet's adaptive power iteration with this tolerance (default: exactly --power-iterations)")
    p.add_argument("--init-zeros", action="store_true", help="normflows' init_zeros=True (last layer / 1000)")
    p.add_argument("--n-invert", type=int, default=d.n_invert, help="latent points to invert (default 10000)")
    p.add_argument("--inverse-tol", type=float, default=d.inverse_tol, help="inversion tolerance (default 1e-5)")
    p.add_argument("--inverse-repeats", type=int, default=d.inverse_repeats, help="inversions timed (median reported)")
    p.add_argument("--skip-inverse", action="store_true", help="only training time and memory")
    p.add_argument("--_memory-worker", dest="memory_worker", choices=["iresnet", "normflows"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    worker = args.memory_worker
    del args.memory_worker
    return Config(**vars(args)), worker


# --------------------------------------------------------------------------------------------
# Data and the shared random tail lengths
# --------------------------------------------------------------------------------------------
def toy_batch(n: int, seed: int, device: torch.device) -> Tensor:
    """``n`` points from 8 Gaussians (std 0.2) evenly spaced on the circle of radius 2."""
    gen = torch.Generator().manual_seed(seed)
    angle = 2 * math.pi * torch.randint(0, 8, (n,), generator=gen) / 8
    centres = 2.0 * torch.stack([angle.cos(), angle.sin()], 1)
    return (centres + 0.2 * torch.randn(n, DIM, generator=gen)).to(device)


class NumpyRoulette(iresnet.Roulette):
    """``iresnet.Roulette`` whose geometric tail length comes from a numpy ``RandomState``.

    normflows draws it with ``np.random.geometric(p, 1)`` per block and forward; drawing from a
    ``RandomState`` with the same seed gives iresnet the same sequence, so both libraries do the
    same number of vector-Jacobian products. Every draw is logged in ``draws``."""

    def __init__(self, rng: np.random.RandomState, draws: list[int], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.rng = rng
        self.draws = draws

    def draw_tail_length(self) -> int:
        n = int(self.rng.geometric(self.p, 1)[0])
        self.draws.append(n)
        return n


# --------------------------------------------------------------------------------------------
# The two models
# --------------------------------------------------------------------------------------------
def build_normflows(cfg: Config) -> nf.NormalizingFlow:
    """normflows' flow; its list runs latent -> data, so ``forward_kld`` walks it backwards."""
    flows: list[nn.Module] = []
    for _ in range(cfg.blocks):
        net = nf.nets.LipschitzMLP(
            [DIM, HIDDEN, HIDDEN, DIM], lipschitz_const=COEFF,
            max_lipschitz_iter=cfg.power_iterations, init_zeros=cfg.init_zeros,
        )
        flows.append(nf.flows.Residual(
            net, reverse=True, reduce_memory=cfg.memory_efficient, n_exact_terms=N_EXACT_TERMS,
            geom_p=GEOM_P, n_samples=1,
        ))
        flows.append(nf.flows.ActNorm(DIM))
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(DIM, trainable=False), flows)


def iresnet_branch(cfg: Config) -> nn.Sequential:
    """LipSwish before every spectrally normalised linear layer, as in ``LipschitzMLP``."""
    sizes = [DIM, HIDDEN, HIDDEN, DIM]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers.append(iresnet.LipSwish())
        layers.append(iresnet.spectral_norm(
            nn.Linear(fan_in, fan_out), COEFF, n_power_iterations=cfg.power_iterations,
            tolerance=cfg.iresnet_sn_tolerance, max_power_iterations=max(50, cfg.power_iterations),
        ))
    return nn.Sequential(*layers)


def build_iresnet(cfg: Config, rng: np.random.RandomState, draws: list[int]) -> iresnet.Sequential:
    """iresnet's flow, data -> latent: ``[ActNorm, ResidualBlock] * blocks``."""
    layers: list[nn.Module] = []
    for _ in range(cfg.blocks):
        estimator = NumpyRoulette(
            rng, draws, n_exact_terms=N_EXACT_TERMS, p=GEOM_P, n_samples=1,
            memory_efficient=cfg.memory_efficient,
        )
        layers.append(iresnet.ActNorm(DIM))
        layers.append(iresnet.ResidualBlock(
            iresnet_branch(cfg), estimator, atol=cfg.inverse_tol, rtol=cfg.inverse_tol,
            max_iter=NF_MAX_INVERSE_ITER,
        ))
    return iresnet.Sequential(*layers)


def data_order_normflows(model: nf.NormalizingFlow) -> list[nn.Module]:
    """normflows' layers in the data -> latent order (the order ``forward_kld`` uses)."""
    return list(reversed(model.flows))


@torch.no_grad()
def copy_normflows_into_iresnet(nf_model: nf.NormalizingFlow, ir_model: iresnet.Sequential) -> None:
    """Make the iresnet model compute exactly the normflows model's function.

    InducedNormLinear keeps ``u`` in the output space and ``v`` in the input space; iresnet's
    SpectralNorm the other way round. normflows' ActNorm maps data by ``(x - t) e^{-s}``,
    iresnet's by ``(x + b) e^{log_scale}``."""
    for nf_layer, ir_layer in zip(data_order_normflows(nf_model), ir_model, strict=True):
        if isinstance(ir_layer, iresnet.ActNorm):
            ir_layer.log_scale.copy_(-nf_layer.s.view(-1))
            ir_layer.bias.copy_(-nf_layer.t.view(-1))
            ir_layer.initialized.fill_(bool(nf_layer.data_dep_init_done > 0))
            continue
        for nf_mod, ir_mod in zip(nf_layer.iresblock.nnet.net, ir_layer.g, strict=True):
            if isinstance(ir_mod, iresnet.LipSwish):
                ir_mod.raw_beta.copy_(nf_mod.beta.view(()))
            else:
                ir_mod.parametrizations.weight.original.copy_(nf_mod.weight)
                ir_mod.bias.copy_(nf_mod.bias)
                sn = ir_mod.parametrizations.weight[0]
                sn.u.copy_(nf_mod.v)
                sn.v.copy_(nf_mod.u)


# --------------------------------------------------------------------------------------------
# Training steps
# --------------------------------------------------------------------------------------------
def standard_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def iresnet_step(model: iresnet.Sequential, opt: torch.optim.Optimizer, x: Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    z, logdet = model(x)
    loss = -(standard_normal_log_prob(z) + logdet).mean()
    loss.backward()
    opt.step()
    return loss.item()


def normflows_step(model: nf.NormalizingFlow, opt: torch.optim.Optimizer, x: Tensor, power_iterations: int) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model.forward_kld(x)
    loss.backward()
    opt.step()
    nf.utils.update_lipschitz(model, power_iterations)
    return loss.item()


@dataclass
class Pair:
    """Both models with their optimisers, ready to train on ``x``."""

    cfg: Config
    x: Tensor
    ir_model: iresnet.Sequential
    nf_model: nf.NormalizingFlow
    ir_opt: torch.optim.Optimizer
    nf_opt: torch.optim.Optimizer
    ir_draws: list[int]

    def step(self, library: str) -> float:
        if library == "iresnet":
            return iresnet_step(self.ir_model, self.ir_opt, self.x)
        return normflows_step(self.nf_model, self.nf_opt, self.x, self.cfg.power_iterations)

    def nf_draws(self) -> list[int]:
        """The tail lengths normflows drew in its last step, in data order."""
        return [int(f.iresblock.last_n_samples[0]) for f in data_order_normflows(self.nf_model)
                if isinstance(f, nf.flows.Residual)]


def build_pair(cfg: Config) -> Pair:
    """Both models with identical weights and identically seeded tail-length generators."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    nf_model = build_normflows(cfg)
    draws: list[int] = []
    ir_model = build_iresnet(cfg, np.random.RandomState(cfg.seed), draws)
    copy_normflows_into_iresnet(nf_model, ir_model)
    nf_model.to(device)
    ir_model.to(device)
    np.random.seed(cfg.seed)
    return Pair(
        cfg, toy_batch(cfg.batch, cfg.seed, device), ir_model, nf_model,
        torch.optim.Adam(ir_model.parameters(), lr=cfg.lr),
        torch.optim.Adam(nf_model.parameters(), lr=cfg.lr), draws,
    )


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_training(pair: Pair) -> dict[str, object]:
    """Interleaved steps; the median time per library and whether the tail draws matched."""
    cfg = pair.cfg
    times: dict[str, list[float]] = {"iresnet": [], "normflows": []}
    losses: dict[str, list[float]] = {"iresnet": [], "normflows": []}
    draws_match = True
    terms = 0
    for i in range(cfg.warmup + cfg.steps):
        before = len(pair.ir_draws)
        for library in ("iresnet", "normflows"):
            synchronize(cfg.device)
            start = time.perf_counter()
            losses[library].append(pair.step(library))
            synchronize(cfg.device)
            if i >= cfg.warmup:
                times[library].append(time.perf_counter() - start)
        step_draws = pair.ir_draws[before:]
        draws_match &= step_draws == pair.nf_draws()
        terms += sum(n + N_EXACT_TERMS for n in step_draws)
    return {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "min_s": {k: min(v) for k, v in times.items()},
        "max_s": {k: max(v) for k, v in times.items()},
        "final_loss": {k: v[-1] for k, v in losses.items()},
        "draws_match": draws_match,
        "mean_terms_per_block": terms / ((cfg.warmup + cfg.steps) * cfg.blocks),
    }


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
class _Packed:
    """A tensor saved for backward, counted while the graph holds it."""

    __slots__ = ("meter", "tensor", "key")

    def __init__(self, meter: SavedTensorMeter, tensor: Tensor, key: int) -> None:
        self.meter, self.tensor, self.key = meter, tensor, key

    def __del__(self) -> None:
        self.meter.release(self.key)


class SavedTensorMeter:
    """Peak bytes of tensors saved for backward that are alive at the same time.

    Storages are counted once however many saved tensors view them; storages of the excluded
    tensors (the parameters) are not counted."""

    def __init__(self, exclude: list[Tensor]) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.current = 0
        self.peak = 0

    def pack(self, tensor: Tensor) -> object:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or storage.nbytes() == 0:
            return tensor
        entry = self.live.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        return _Packed(self, tensor, key)

    @staticmethod
    def unpack(packed: object) -> Tensor:
        return packed.tensor if isinstance(packed, _Packed) else packed  # type: ignore[return-value]

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    @contextlib.contextmanager
    def track(self) -> Iterator[SavedTensorMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self


def saved_tensor_peak(pair: Pair, library: str) -> tuple[int, int]:
    """Peak live saved-tensor bytes of one training step, and the bytes still held after it
    (should be 0: otherwise the meter leaked or a graph outlived the step)."""
    model = pair.ir_model if library == "iresnet" else pair.nf_model
    meter = SavedTensorMeter([*model.parameters(), *model.buffers()])
    with meter.track():
        pair.step(library)
    gc.collect()
    return meter.peak, meter.current


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(cfg: Config, library: str) -> dict[str, object]:
    """Run in a fresh process: warm up, then the peak RSS increase of each measured step."""
    torch.set_num_threads(cfg.threads)
    pair = build_pair(cfg)
    can_reset = _reset_peak_rss()
    warmup = cfg.warmup if can_reset else 0
    steps = cfg.memory_steps if can_reset else 1
    for _ in range(warmup):
        pair.step(library)
    deltas = []
    for _ in range(steps):
        gc.collect()
        if can_reset:
            _reset_peak_rss()
            before = _proc_status_kib("VmRSS")
            pair.step(library)
            deltas.append(_proc_status_kib("VmHWM") - before)
        else:  # no resettable counter: the first step from a fresh process, ru_maxrss in KiB
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            pair.step(library)
            deltas.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    return {"peak_kib": max(deltas), "deltas_kib": deltas, "method": "clear_refs" if can_reset else "ru_maxrss"}


def rss_peak_in_subprocess(argv: list[str], library: str) -> dict[str, object]:
    """Re-run this script as a memory worker for ``library`` in a fresh interpreter."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv, "--_memory-worker", library],
        env=env, check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_step_peak(pair: Pair, library: str) -> int:
    """Bytes allocated at the peak of one step beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    pair.step(library)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# --------------------------------------------------------------------------------------------
# Inversion
# --------------------------------------------------------------------------------------------
class CallCounter:
    """Counts calls of a module and the rows they were given (forward hook)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.calls = 0
        self.rows = 0
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.calls += 1
        self.rows += args[0].shape[0]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class InverseResult:
    seconds: float
    x: Tensor
    iterations: int = 0  # summed over blocks (for normflows: loop iterations)
    evaluations: int = 0  # calls of g
    sample_evaluations: int = 0  # rows passed through g
    forward_error: float = float("nan")  # max |f(x) - z| with the library's own forward map


def prepare_for_inversion(pair: Pair) -> None:
    """Eval mode, identical weights, converged spectral norms in both."""
    copy_normflows_into_iresnet(pair.nf_model, pair.ir_model)
    pair.nf_model.eval()
    pair.ir_model.eval()
    nf.utils.update_lipschitz(pair.nf_model, NF_CONVERGE_ITERATIONS)
    iresnet.converge_spectral_norms(pair.ir_model)


def timed(fn: Callable[[], Tensor], repeats: int, device: str) -> tuple[float, Tensor]:
    """Median seconds of ``repeats`` calls and the last result."""
    times, out = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out  # type: ignore[return-value]


@torch.no_grad()
def iresnet_forward_map(model: iresnet.Sequential, x: Tensor) -> Tensor:
    for layer in model:
        x = x + layer.g(x) if isinstance(layer, iresnet.ResidualBlock) else layer(x)[0]
    return x


@torch.no_grad()
def normflows_forward_map(model: nf.NormalizingFlow, x: Tensor) -> Tensor:
    for flow in data_order_normflows(model):
        x = flow.iresblock.forward(x) if isinstance(flow, nf.flows.Residual) else flow.inverse(x)[0]
    return x


def invert_iresnet(pair: Pair, z: Tensor, method: str) -> InverseResult:
    blocks = [m for m in pair.ir_model if isinstance(m, iresnet.ResidualBlock)]
    for b in blocks:
        b.inverse_method = method

    def run() -> Tensor:
        with torch.no_grad():
            return pair.ir_model.inverse(z)

    seconds, x = timed(run, pair.cfg.inverse_repeats, pair.cfg.device)
    reports = [b.last_inversion for b in blocks]
    return InverseResult(
        seconds, x,
        sum(r.iterations for r in reports), sum(r.evaluations for r in reports),
        sum(r.sample_evaluations for r in reports),
        (iresnet_forward_map(pair.ir_model, x) - z).abs().max().item(),
    )


def invert_normflows(pair: Pair, z: Tensor, atol: float | None) -> InverseResult:
    """Sampling direction, inversion only (``Residual.forward`` would add a log-det):
    ``iResBlock.inverse`` (its defaults) or, with ``atol``, ``_inverse_fixed_point(atol=rtol=atol)``."""
    flows = list(pair.nf_model.flows)
    nets = [f.iresblock.nnet for f in flows if isinstance(f, nf.flows.Residual)]

    def run() -> Tensor:
        y = z
        with torch.no_grad():
            for flow in flows:
                if not isinstance(flow, nf.flows.Residual):
                    y = flow(y)[0]
                elif atol is None:
                    y = flow.iresblock.inverse(y)
                else:
                    y = flow.iresblock._inverse_fixed_point(y, atol=atol, rtol=atol)
        return y

    seconds, x = timed(run, pair.cfg.inverse_repeats, pair.cfg.device)
    counter = CallCounter(nets)
    run()
    counter.remove()
    # every call but the first of each block is one loop iteration
    return InverseResult(
        seconds, x, counter.calls - len(nets), counter.calls, counter.rows,
        (normflows_forward_map(pair.nf_model, x) - z).abs().max().item(),
    )


def normflows_sample_api_seconds(pair: Pair, z: Tensor) -> float:
    """``NormalizingFlow.forward(z)``: normflows' public latent -> data call (default tolerance,
    plus the exact 2x2 log-det its eval mode computes per block)."""
    def run() -> Tensor:
        with torch.no_grad():
            return pair.nf_model.forward(z)
    return timed(run, 1, pair.cfg.device)[0]


def benchmark_inversion(pair: Pair) -> dict[str, object]:
    cfg = pair.cfg
    prepare_for_inversion(pair)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    z = torch.randn(cfg.n_invert, DIM, generator=gen).to(cfg.device)
    matched_atol = cfg.inverse_tol**2
    results = {
        "ir_anderson": invert_iresnet(pair, z, "anderson"),
        "ir_fixed": invert_iresnet(pair, z, "fixed_point"),
        "nf_matched": invert_normflows(pair, z, matched_atol),
        "nf_default": invert_normflows(pair, z, None),
    }
    return {
        "results": results,
        "nf_sample_api_s": normflows_sample_api_seconds(pair, z),
        "max_diff_anderson_vs_nf": (results["ir_anderson"].x - results["nf_matched"].x).abs().max().item(),
        "nf_matched_atol": matched_atol,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def table(rows: list[tuple[str, str, str, str, str]]) -> str:
    header = ("measurement", "iresnet", "normflows", "iresnet / normflows", "target")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def describe(cfg: Config) -> str:
    sn = (f"iresnet spectral_norm(n_power_iterations={cfg.power_iterations}, tolerance=None): "
          f"exactly {cfg.power_iterations} per training forward"
          if cfg.iresnet_sn_tolerance is None else
          f"iresnet spectral_norm(n_power_iterations={cfg.power_iterations}, "
          f"tolerance={cfg.iresnet_sn_tolerance}): at least {cfg.power_iterations}, up to 50 per training forward")
    return "\n".join([
        f"- torch {torch.__version__}, normflows {nf.__version__}, iresnet {iresnet.__version__}, "
        f"device {cfg.device}, torch.set_num_threads({cfg.threads}), {platform.processor() or platform.machine()}",
        f"- model: {cfg.blocks} x [ActNorm, residual block], branch Swish-Linear(2,128)-Swish-Linear(128,128)-"
        f"Swish-Linear(128,2), coeff {COEFF}, init_zeros={cfg.init_zeros}; identical weights in both",
        f"- log-det: Roulette, {N_EXACT_TERMS} exact terms + geometric({GEOM_P}) tail, 1 Hutchinson sample, "
        f"iresnet memory_efficient={cfg.memory_efficient} / normflows reduce_memory={cfg.memory_efficient}",
        f"- power iterations: normflows update_lipschitz(model, {cfg.power_iterations}) "
        f"after every optimizer step (its forward runs none); {sn}",
        f"- training: batch {cfg.batch}, Adam lr {cfg.lr}, {cfg.warmup} warm-up steps, median of {cfg.steps} "
        f"interleaved steps, seed {cfg.seed}",
    ])


def report(cfg: Config, train: dict, memory: dict, inversion: dict | None) -> str:
    med = train["median_s"]
    rows: list[tuple[str, str, str, str, str]] = [(
        f"training step, median of {cfg.steps} (ms)",
        f"{1e3 * med['iresnet']:.1f}", f"{1e3 * med['normflows']:.1f}",
        ratio(med["iresnet"], med["normflows"]), "<= 0.5",
    )]
    for label, key in memory["rows"]:
        ir, nfv = memory[key]["iresnet"], memory[key]["normflows"]
        rows.append((label, f"{ir / 2**20:.2f}", f"{nfv / 2**20:.2f}", ratio(ir, nfv), "<= 1"))
    if inversion is not None:
        r = inversion["results"]
        nfm = r["nf_matched"]
        tol = f"{cfg.inverse_tol:g}"
        rows += [
            (f"invert {cfg.n_invert:,} to {tol}: iresnet Anderson vs normflows fixed point (s)",
             f"{r['ir_anderson'].seconds:.3f}", f"{nfm.seconds:.3f}", ratio(r["ir_anderson"].seconds, nfm.seconds), "<= 0.5"),
            (f"invert {cfg.n_invert:,} to {tol}: iresnet fixed point vs normflows fixed point (s)",
             f"{r['ir_fixed'].seconds:.3f}", f"{nfm.seconds:.3f}", ratio(r["ir_fixed"].seconds, nfm.seconds), ""),
            ("g evaluations, sum over blocks: Anderson / fixed point vs normflows",
             f"{r['ir_anderson'].evaluations} / {r['ir_fixed'].evaluations}", f"{nfm.evaluations}",
             ratio(r["ir_anderson"].evaluations, nfm.evaluations), ""),
            ("rows through g (sample evaluations): Anderson / fixed point vs normflows",
             f"{r['ir_anderson'].sample_evaluations:,} / {r['ir_fixed'].sample_evaluations:,}", f"{nfm.sample_evaluations:,}",
             ratio(r["ir_anderson"].sample_evaluations, nfm.sample_evaluations), ""),
            ("max |f(x) - z| after inversion: Anderson / fixed point vs normflows",
             f"{r['ir_anderson'].forward_error:.1e} / {r['ir_fixed'].forward_error:.1e}", f"{nfm.forward_error:.1e}", "", ""),
        ]
    out = [describe(cfg), "", table(rows), ""]
    out.append(
        f"- tail draws identical in both libraries at every step: {train['draws_match']}; "
        f"mean series terms per block and step: {train['mean_terms_per_block']:.2f}"
    )
    out.append(
        "- training step min / max (ms): iresnet "
        f"{1e3 * train['min_s']['iresnet']:.1f} / {1e3 * train['max_s']['iresnet']:.1f}, normflows "
        f"{1e3 * train['min_s']['normflows']:.1f} / {1e3 * train['max_s']['normflows']:.1f}; final loss iresnet "
        f"{train['final_loss']['iresnet']:.4f}, normflows {train['final_loss']['normflows']:.4f}"
    )
    out += [f"- {line}" for line in memory["notes"]]
    if inversion is not None:
        r = inversion["results"]
        nfd = r["nf_default"]
        out += [
            f"- normflows inversion, matched: _inverse_fixed_point(atol=rtol={inversion['nf_matched_atol']:g}) on the "
            f"squared step (stops at |dx| < {cfg.inverse_tol:g} sqrt(1+|y|)); iresnet: atol=rtol={cfg.inverse_tol:g} "
            f"per element (|dx| <= {cfg.inverse_tol:g} (1+|x|)), max_iter {NF_MAX_INVERSE_ITER} in both",
            f"- normflows with its default (atol=rtol=1e-5 on the squared step, |dx| < ~3e-3): "
            f"{nfd.seconds:.3f} s, {nfd.evaluations} g evaluations, max |f(x) - z| {nfd.forward_error:.1e}; "
            f"its public NormalizingFlow.forward(z) (same, plus an exact 2x2 log-det per block): "
            f"{inversion['nf_sample_api_s']:.3f} s",
            f"- iresnet iterations summed over blocks: Anderson {r['ir_anderson'].iterations}, fixed point "
            f"{r['ir_fixed'].iterations}; normflows {r['nf_matched'].iterations}. max |x_iresnet(Anderson) - "
            f"x_normflows| = {inversion['max_diff_anderson_vs_nf']:.1e}; inversion times are the median of "
            f"{cfg.inverse_repeats}",
        ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def measure_memory(cfg: Config, pair: Pair, argv: list[str]) -> dict[str, object]:
    """Peak memory of a training step per library (see the module docstring)."""
    memory: dict[str, object] = {"rows": [], "notes": []}
    saved = {lib: saved_tensor_peak(pair, lib) for lib in ("iresnet", "normflows")}
    memory["saved"] = {lib: v[0] for lib, v in saved.items()}
    if cfg.device.startswith("cuda"):
        memory["cuda"] = {lib: max(cuda_step_peak(pair, lib) for _ in range(cfg.memory_steps))
                          for lib in ("iresnet", "normflows")}
        memory["rows"].append(("peak CUDA memory of a step, max_memory_allocated - before (MiB)", "cuda"))
    else:
        workers = {lib: rss_peak_in_subprocess(argv, lib) for lib in ("iresnet", "normflows")}
        memory["rss"] = {lib: 1024 * w["peak_kib"] for lib, w in workers.items()}
        method = workers["iresnet"]["method"]
        label = ("peak RSS increase during a step, fresh process (MiB)" if method == "clear_refs"
                 else "peak RSS increase, first step of a fresh process (MiB)")
        memory["rows"].append((label, "rss"))
        memory["notes"].append(
            f"RSS per measured step (KiB, after {cfg.warmup if method == 'clear_refs' else 0} warm-up steps, "
            f"glibc mmap threshold 64 KiB): iresnet {workers['iresnet']['deltas_kib']}, "
            f"normflows {workers['normflows']['deltas_kib']}"
        )
    memory["rows"].append(("autograd saved tensors, peak alive in a step (MiB)", "saved"))
    leaked = {lib: v[1] for lib, v in saved.items() if v[1]}
    if leaked:
        memory["notes"].append(f"saved-tensor bytes still alive after the step (expected 0): {leaked}")
    return memory


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg, worker = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    if worker is not None:
        print(json.dumps(memory_worker(cfg, worker)))
        return
    started = time.perf_counter()
    pair = build_pair(cfg)
    train = time_training(pair)
    memory = measure_memory(cfg, pair, argv)
    inversion = None if cfg.skip_inverse else benchmark_inversion(pair)
    print(f"# toy 2-D residual flow: iresnet vs normflows ({datetime.date.today().isoformat()})\n")
    print(report(cfg, train, memory, inversion))
    print(f"- total benchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
