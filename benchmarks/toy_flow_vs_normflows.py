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
``spectral_norm(..., n_power_iterations=P)``, which runs exactly P iterations per training
forward (``--power-iterations P``, default 5 = normflows' ``max_lipschitz_iter`` default). Older
iresnet versions whose ``spectral_norm`` has a ``tolerance`` option get ``tolerance=None`` (the
same fixed count), or ``--iresnet-sn-tolerance`` for their adaptive rule. Both libraries
converge their estimates at construction; inversion converges them again (below).

Threads: ``torch.set_num_threads(--threads)`` for both, default all cores. On a VM whose
vCPUs are shared, OpenMP's spinning threads can make multi-threaded timings swing tenfold;
``--threads 1`` is then the steadier choice.

What is measured
----------------
* Training step: forward + log-det + backward + Adam step (+ the power iterations above),
  median over ``--steps`` steps after ``--warmup`` steps; iresnet and normflows steps are
  interleaved, and the ratio is the median of the per-step ratios, so that drifts of the
  machine's speed hit both alike.
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
* Inversion of 10,000 standard-normal latent points to 1e-5. At initialisation every block
  converges in about 3 evaluations of g (Lip(g) is far below 0.9 there), so the normflows model
  is first trained ``--pretrain-steps`` more steps (untimed, default 400, Adam lr 3e-3; then
  Lip(g) is about 0.72 per block) and its weights copied into iresnet: both invert the same
  function. Models in eval mode with converged spectral norms
  (``iresnet.converge_spectral_norms`` / ``nf.utils.update_lipschitz(model, 200)``):
  iresnet ``Sequential.inverse`` with every block's ``inverse_method`` set to ``"anderson"`` or
  ``"fixed_point"`` and ``atol = rtol = 1e-5`` (per element: ``|f(x)-x| <= atol + rtol |f(x)|``);
  normflows' ``iResBlock.inverse`` iterates ``x <- y - g(x)`` on the whole batch until
  ``(x - x_prev)**2 / (atol + rtol |y|) < 1`` for all elements, at most 1000 iterations, with
  ``atol = rtol = 1e-5`` hard-wired. Because the step is *squared* there, its default stops at a
  step of about ``sqrt(1e-5) ~ 3e-3``; the "matched" normflows run calls its
  ``_inverse_fixed_point(y, atol=1e-10, rtol=1e-10)``, i.e. a step below ``1e-5 sqrt(1 + |y|)``,
  comparable to iresnet's rule. Ratios use the matched run; the default is shown for reference.
  ``--inverse-repeats`` interleaved rounds (median; ratio = median of per-round ratios), after
  one untimed warm-up on 1,000 points. The g evaluations are counted by iresnet's
  ``InversionReport`` and, for normflows, by a forward hook on each branch; the result is checked
  with each library's own forward map (``max |f(x) - z|``).
* Allocator: by default (``--malloc retain``) glibc is told (``mallopt``) to keep freed memory,
  because otherwise every large temporary is page-faulted in afresh and the kernel time
  (reported per inversion) adds run-to-run noise to both libraries; ``--malloc default`` keeps
  glibc's heuristics.
* ``--profile`` prints torch.profiler and cProfile tables of iresnet's (and normflows')
  training step and Anderson inversion after the table.

Run ``python benchmarks/toy_flow_vs_normflows.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import inspect
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
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    inverse_tol: float = 1e-5
    inverse_repeats: int = 5
    skip_inverse: bool = False
    profile: bool = False
    malloc: str = "retain"


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
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps,
                   help="untimed normflows training steps before the inversion benchmark (default 400)")
    p.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr, help="their Adam learning rate (default 3e-3)")
    p.add_argument("--n-invert", type=int, default=d.n_invert, help="latent points to invert (default 10000)")
    p.add_argument("--inverse-tol", type=float, default=d.inverse_tol, help="inversion tolerance (default 1e-5)")
    p.add_argument("--inverse-repeats", type=int, default=d.inverse_repeats, help="inversions timed (median reported)")
    p.add_argument("--skip-inverse", action="store_true", help="only training time and memory")
    p.add_argument("--profile", action="store_true",
                   help="after the table, profile iresnet's training step and Anderson inversion (and normflows')")
    p.add_argument("--malloc", choices=["retain", "default"], default=d.malloc,
                   help="retain (default): glibc keeps freed memory for reuse (mallopt), so that timings do not "
                        "depend on page-fault churn; default: glibc's own heuristics")
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


def spectral_norm_has_tolerance() -> bool:
    """Whether this iresnet's ``spectral_norm`` takes ``tolerance`` (adaptive iteration count);
    without it every training forward runs exactly ``n_power_iterations`` steps."""
    return "tolerance" in inspect.signature(iresnet.spectral_norm).parameters


def spectral_norm_options(cfg: Config) -> dict[str, object]:
    if spectral_norm_has_tolerance():
        return {"tolerance": cfg.iresnet_sn_tolerance, "max_power_iterations": max(50, cfg.power_iterations)}
    if cfg.iresnet_sn_tolerance is not None:
        raise SystemExit("--iresnet-sn-tolerance: this iresnet's spectral_norm has no tolerance option")
    return {}


def iresnet_branch(cfg: Config) -> nn.Sequential:
    """LipSwish before every spectrally normalised linear layer, as in ``LipschitzMLP``."""
    sizes = [DIM, HIDDEN, HIDDEN, DIM]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers.append(iresnet.LipSwish())
        layers.append(iresnet.spectral_norm(
            nn.Linear(fan_in, fan_out), COEFF, n_power_iterations=cfg.power_iterations,
            **spectral_norm_options(cfg),
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
    ir_rng: np.random.RandomState

    def reseed_tail_draws(self, seed: int) -> None:
        """Restart both tail-length generators at the same state."""
        self.ir_rng.seed(seed)
        np.random.seed(seed)

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
    rng = np.random.RandomState(cfg.seed)
    ir_model = build_iresnet(cfg, rng, draws)
    copy_normflows_into_iresnet(nf_model, ir_model)
    nf_model.to(device)
    ir_model.to(device)
    np.random.seed(cfg.seed)
    return Pair(
        cfg, toy_batch(cfg.batch, cfg.seed, device), ir_model, nf_model,
        torch.optim.Adam(ir_model.parameters(), lr=cfg.lr),
        torch.optim.Adam(nf_model.parameters(), lr=cfg.lr), draws, rng,
    )


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc returns large freed blocks to the kernel (``munmap``, heap trimming), and
    the next allocation of a 5 MB activation page-faults every page in again. In this VM that
    kernel time was 15-50 % of an inversion and varied from run to run with the allocation
    history, for both libraries. A fixed mmap threshold of 32 MiB (glibc's maximum) and an
    unreachable trim threshold remove that noise. Returns False where glibc is not found."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median of ``a[i] / b[i]``: runs done back to back share the machine's speed of the
    moment, so the ratio of each pair is steadier than the ratio of two medians on a machine
    whose speed drifts."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


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
        "paired_ratio": paired_ratio(times["iresnet"], times["normflows"]),
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
        # Detached: holding a saved *output* itself would tie it to its own grad_fn in a
        # reference cycle that outlives graphs never run backward (autograd restores the
        # graph metadata on unpack).
        self.meter, self.tensor, self.key = meter, tensor.detach(), key

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
    """Counts calls of some modules and the rows they were given (forward hooks)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.calls = 0
        self.rows = 0
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.calls += 1
        self.rows += args[0].shape[0]

    def reset(self) -> None:
        self.calls = self.rows = 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Inversion:
    """One way of inverting the flow: ``run(z)`` returns ``x`` and the cost counters
    ``(iterations, evaluations of g, rows through g)`` summed over the blocks."""

    library: str
    run: Callable[[Tensor], tuple[Tensor, tuple[int, int, int]]]
    forward_map: Callable[[Tensor], Tensor]
    seconds: list[float] = field(default_factory=list)
    counts: tuple[int, int, int] = (0, 0, 0)
    forward_error: float = float("nan")  # max |f(x) - z|, f the library's own forward map
    x: Tensor | None = None
    kernel_seconds: list[float] = field(default_factory=list)  # system CPU time (page faults...)
    page_faults: list[int] = field(default_factory=list)  # minor page faults


def pretrain(pair: Pair) -> float:
    """Train the normflows model (untimed for the table) so that its blocks are no longer the
    near-identity maps of initialisation; returns the seconds it took."""
    cfg = pair.cfg
    pair.nf_model.train()
    opt = torch.optim.Adam(pair.nf_model.parameters(), lr=cfg.pretrain_lr)
    start = time.perf_counter()
    for _ in range(cfg.pretrain_steps):
        normflows_step(pair.nf_model, opt, pair.x, cfg.power_iterations)
    return time.perf_counter() - start


def prepare_for_inversion(pair: Pair) -> list[float]:
    """Eval mode, identical weights, converged spectral norms in both; returns the certified
    Lipschitz bound of every iresnet branch."""
    copy_normflows_into_iresnet(pair.nf_model, pair.ir_model)
    pair.nf_model.eval()
    pair.ir_model.eval()
    nf.utils.update_lipschitz(pair.nf_model, NF_CONVERGE_ITERATIONS)
    iresnet.converge_spectral_norms(pair.ir_model)
    return [iresnet.lipschitz_bound(b.g, (DIM,)) for b in iresnet_blocks(pair.ir_model)]


def iresnet_blocks(model: iresnet.Sequential) -> list[iresnet.ResidualBlock]:
    return [m for m in model if isinstance(m, iresnet.ResidualBlock)]


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


def iresnet_inversion(model: iresnet.Sequential, method: str, atol: float, rtol: float) -> Inversion:
    """``iresnet.Sequential.inverse`` with every block set to ``method``, ``atol``, ``rtol``."""
    blocks = iresnet_blocks(model)

    def run(z: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        for b in blocks:
            b.inverse_method, b.atol, b.rtol = method, atol, rtol
        with torch.no_grad():
            x = model.inverse(z)
        reports = [b.last_inversion for b in blocks]
        return x, (sum(r.iterations for r in reports), sum(r.evaluations for r in reports),
                   sum(r.sample_evaluations for r in reports))

    return Inversion("iresnet", run, lambda x: iresnet_forward_map(model, x))


def normflows_inversion(model: nf.NormalizingFlow, atol: float | None) -> Inversion:
    """The sampling direction, inversion only (``Residual.forward`` would add a log-det):
    ``iResBlock.inverse`` (its defaults) or, with ``atol``,
    ``iResBlock._inverse_fixed_point(y, atol=atol, rtol=atol)``."""
    flows = list(model.flows)
    counter = CallCounter([f.iresblock.nnet for f in flows if isinstance(f, nf.flows.Residual)])
    n_blocks = len(counter.handles)

    def run(z: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        counter.reset()
        y = z
        with torch.no_grad():
            for flow in flows:
                if not isinstance(flow, nf.flows.Residual):
                    y = flow(y)[0]
                elif atol is None:
                    y = flow.iresblock.inverse(y)
                else:
                    y = flow.iresblock._inverse_fixed_point(y, atol=atol, rtol=atol)
        # each block evaluates g once before its loop, then once per iteration
        return y, (counter.calls - n_blocks, counter.calls, counter.rows)

    return Inversion("normflows", run, lambda x: normflows_forward_map(model, x))


def run_inversions(variants: dict[str, Inversion], z: Tensor, cfg: Config) -> None:
    """One untimed warm-up on 1,000 points each, then ``inverse_repeats`` interleaved rounds."""
    for v in variants.values():
        v.run(z[:1000])
    for _ in range(cfg.inverse_repeats):
        for v in variants.values():
            synchronize(cfg.device)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            v.x, v.counts = v.run(z)
            synchronize(cfg.device)
            v.seconds.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            v.kernel_seconds.append(after.ru_stime - usage.ru_stime)
            v.page_faults.append(after.ru_minflt - usage.ru_minflt)
    for v in variants.values():
        v.forward_error = (v.forward_map(v.x) - z).abs().max().item()


def normflows_sample_api_seconds(model: nf.NormalizingFlow, z: Tensor, device: str) -> float:
    """``NormalizingFlow.forward(z)``: normflows' public latent -> data call (default tolerance,
    plus the exact 2x2 log-det its eval mode computes in every block)."""
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.forward(z)
    synchronize(device)
    return time.perf_counter() - start


def benchmark_inversion(pair: Pair) -> dict[str, object]:
    cfg = pair.cfg
    pretrain_s = pretrain(pair)
    bounds = prepare_for_inversion(pair)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    z = torch.randn(cfg.n_invert, DIM, generator=gen).to(cfg.device)
    tol = cfg.inverse_tol
    variants = {
        "ir_anderson": iresnet_inversion(pair.ir_model, "anderson", tol, tol),
        "ir_fixed": iresnet_inversion(pair.ir_model, "fixed_point", tol, tol),
        "ir_anderson_strict": iresnet_inversion(pair.ir_model, "anderson", tol, 0.0),
        "nf_matched": normflows_inversion(pair.nf_model, tol**2),
        "nf_default": normflows_inversion(pair.nf_model, None),
    }
    run_inversions(variants, z, cfg)
    return {
        "variants": variants,
        "pretrain_s": pretrain_s,
        "lipschitz_bounds": bounds,
        "nf_sample_api_s": normflows_sample_api_seconds(pair.nf_model, z, cfg.device),
        "max_diff_anderson_vs_nf": (variants["ir_anderson"].x - variants["nf_matched"].x).abs().max().item(),
        "nf_matched_atol": tol**2,
        "z": z,
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


def iresnet_source() -> str:
    """The git commit of the iresnet checkout and whether ``src/`` has uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "src"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown source"
    return f"commit {head}" + (" + uncommitted changes in src/" if dirty else "")


def describe(cfg: Config) -> str:
    if cfg.iresnet_sn_tolerance is not None:
        sn = (f"iresnet spectral_norm(n_power_iterations={cfg.power_iterations}, tolerance="
              f"{cfg.iresnet_sn_tolerance}): at least {cfg.power_iterations}, up to 50 per training forward")
    else:
        extra = ", tolerance=None" if spectral_norm_has_tolerance() else ""
        sn = (f"iresnet spectral_norm(n_power_iterations={cfg.power_iterations}{extra}): "
              f"exactly {cfg.power_iterations} per training forward")
    return "\n".join([
        f"- torch {torch.__version__}, normflows {nf.__version__}, iresnet {iresnet.__version__} "
        f"({iresnet_source()}), "
        f"device {cfg.device}, torch.set_num_threads({cfg.threads}) on {os.cpu_count()} logical CPUs "
        f"({platform.machine()}), Python {platform.python_version()}",
        f"- model: {cfg.blocks} x [ActNorm, residual block], branch Swish-Linear(2,128)-Swish-Linear(128,128)-"
        f"Swish-Linear(128,2), coeff {COEFF}, init_zeros={cfg.init_zeros}; identical weights in both",
        f"- log-det: Roulette, {N_EXACT_TERMS} exact terms + geometric({GEOM_P}) tail, 1 Hutchinson sample, "
        f"iresnet memory_efficient={cfg.memory_efficient} / normflows reduce_memory={cfg.memory_efficient}",
        f"- power iterations: normflows update_lipschitz(model, {cfg.power_iterations}) "
        f"after every optimizer step (its forward runs none); {sn}",
        f"- training: batch {cfg.batch}, Adam lr {cfg.lr}, {cfg.warmup} warm-up steps, median of {cfg.steps} "
        f"interleaved steps, seed {cfg.seed}; glibc malloc: {cfg.malloc}",
    ])


def inversion_rows(cfg: Config, inv: dict) -> list[tuple[str, str, str, str, str]]:
    v: dict[str, Inversion] = inv["variants"]
    sec = {k: statistics.median(x.seconds) for k, x in v.items()}
    nfm, n, tol = v["nf_matched"], f"{cfg.n_invert:,}", f"{cfg.inverse_tol:g}"
    a, f, s = v["ir_anderson"], v["ir_fixed"], v["ir_anderson_strict"]

    def vs_nf(key: str) -> str:
        return f"{paired_ratio(v[key].seconds, nfm.seconds):.2f}"

    return [
        (f"invert {n} to {tol}: iresnet Anderson vs normflows fixed point (s)",
         f"{sec['ir_anderson']:.3f}", f"{sec['nf_matched']:.3f}", vs_nf("ir_anderson"), "<= 0.5"),
        (f"invert {n} to {tol}: iresnet fixed point vs normflows fixed point (s)",
         f"{sec['ir_fixed']:.3f}", f"{sec['nf_matched']:.3f}", vs_nf("ir_fixed"), ""),
        (f"invert {n}: iresnet Anderson with rtol=0 (stricter) vs normflows (s)",
         f"{sec['ir_anderson_strict']:.3f}", f"{sec['nf_matched']:.3f}", vs_nf("ir_anderson_strict"), ""),
        ("g evaluations summed over blocks: Anderson / fixed point / Anderson rtol=0",
         f"{a.counts[1]} / {f.counts[1]} / {s.counts[1]}", f"{nfm.counts[1]}", ratio(a.counts[1], nfm.counts[1]), ""),
        ("rows through g (sample evaluations): Anderson / fixed point / Anderson rtol=0",
         f"{a.counts[2]:,} / {f.counts[2]:,} / {s.counts[2]:,}", f"{nfm.counts[2]:,}",
         ratio(a.counts[2], nfm.counts[2]), ""),
        ("max abs(f(x) - z) after inversion: Anderson / fixed point / Anderson rtol=0",
         f"{a.forward_error:.1e} / {f.forward_error:.1e} / {s.forward_error:.1e}", f"{nfm.forward_error:.1e}", "", ""),
    ]


def inversion_notes(cfg: Config, inv: dict) -> list[str]:
    v: dict[str, Inversion] = inv["variants"]
    nfd = v["nf_default"]
    bounds = inv["lipschitz_bounds"]
    tol = f"{cfg.inverse_tol:g}"
    return [
        f"inversion model: the normflows model after {cfg.pretrain_steps} more untimed training steps (Adam lr "
        f"{cfg.pretrain_lr}, {inv['pretrain_s']:.0f} s), weights copied into iresnet; certified Lip(g) per block "
        f"(iresnet.lipschitz_bound) {min(bounds):.3f} to {max(bounds):.3f}",
        f"normflows matched: _inverse_fixed_point(y, atol=rtol={inv['nf_matched_atol']:g}) on its squared step, i.e. "
        f"stop when every abs(dx) < {tol} sqrt(1 + abs(y)), whole batch until the last element converges; iresnet "
        f"atol=rtol={tol}: per sample, abs(dx) <= {tol} (1 + abs(x)) (rtol=0: abs(dx) <= {tol}); cap "
        f"{NF_MAX_INVERSE_ITER} iterations in both",
        f"normflows with its own default (atol=rtol=1e-5 on the squared step, so abs(dx) < ~3e-3): "
        f"{statistics.median(nfd.seconds):.3f} s, {nfd.counts[1]} g evaluations, max abs(f(x) - z) "
        f"{nfd.forward_error:.1e}; its public NormalizingFlow.forward(z) (that, plus an exact 2x2 log-det per "
        f"block): {inv['nf_sample_api_s']:.3f} s",
        f"iterations summed over blocks (iresnet: InversionReport.iterations; normflows: loop iterations after "
        f"its first x = y - g(y)): iresnet Anderson {v['ir_anderson'].counts[0]}, fixed point "
        f"{v['ir_fixed'].counts[0]}; normflows {v['nf_matched'].counts[0]}; max abs(x_iresnet Anderson - "
        f"x_normflows) = {inv['max_diff_anderson_vs_nf']:.1e}",
        f"inversion seconds of the {cfg.inverse_repeats} interleaved rounds (the table gives medians, "
        f"and the median of the per-round ratios): " + ", ".join(
            f"{k} [{', '.join(f'{t:.2f}' for t in x.seconds)}]" for k, x in v.items()),
        "median kernel (system) CPU seconds and minor page faults per inversion, mostly fresh pages for "
        "large temporaries: " + ", ".join(
            f"{k} {statistics.median(x.kernel_seconds):.2f} s / {statistics.median(x.page_faults):,.0f}"
            for k, x in v.items()),
    ]


def report(cfg: Config, train: dict, memory: dict, inversion: dict | None) -> str:
    med = train["median_s"]
    rows: list[tuple[str, str, str, str, str]] = [(
        f"training step, median of {cfg.steps} (ms)",
        f"{1e3 * med['iresnet']:.1f}", f"{1e3 * med['normflows']:.1f}",
        f"{train['paired_ratio']:.2f}", "<= 0.5",
    )]
    for label, key in memory["rows"]:
        ir, nfv = memory[key]["iresnet"], memory[key]["normflows"]
        rows.append((label, f"{ir / 2**20:.2f}", f"{nfv / 2**20:.2f}", ratio(ir, nfv), "<= 1"))
    if inversion is not None:
        rows += inversion_rows(cfg, inversion)
    notes = [
        "time ratios are medians of back-to-back pairs (step i of both libraries, or one round of "
        "inversions); memory ratios are plain ratios",
        f"tail draws identical in both libraries at every step: {train['draws_match']}; "
        f"mean series terms per block and step: {train['mean_terms_per_block']:.2f}",
        "training step min / max (ms): iresnet "
        f"{1e3 * train['min_s']['iresnet']:.1f} / {1e3 * train['max_s']['iresnet']:.1f}, normflows "
        f"{1e3 * train['min_s']['normflows']:.1f} / {1e3 * train['max_s']['normflows']:.1f}; loss after the timed "
        f"steps: iresnet {train['final_loss']['iresnet']:.4f}, normflows {train['final_loss']['normflows']:.4f}",
        *memory["notes"],
        *([] if inversion is None else inversion_notes(cfg, inversion)),
    ]
    return "\n".join([describe(cfg), "", table(rows), "", *[f"- {n}" for n in notes]])


# --------------------------------------------------------------------------------------------
# Profiles (--profile)
# --------------------------------------------------------------------------------------------
def torch_profile(fn: Callable[[], object], repeats: int, rows: int = 14) -> str:
    """torch.profiler's operator table, sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def python_profile(fn: Callable[[], object], repeats: int, sort: str, rows: int = 18) -> str:
    """cProfile's function table (``sort`` = "tottime" or "cumulative")."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeats):
        fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(sort).print_stats(rows)
    return "\n".join(line for line in out.getvalue().splitlines() if line.strip())


def profiles(pair: Pair, z: Tensor | None) -> str:
    """Where the time goes: iresnet's (and normflows') training step and, with ``z``, the
    Anderson inversion of ``z`` against normflows' matched fixed point."""
    cfg = pair.cfg
    pair.ir_model.train()
    pair.nf_model.train()
    parts = []
    for library in ("iresnet", "normflows"):
        pair.reseed_tail_draws(cfg.seed + 2)
        parts.append(f"### {library} training step x3, torch.profiler (self CPU)\n"
                     + torch_profile(lambda: pair.step(library), 3))
    pair.reseed_tail_draws(cfg.seed + 2)
    parts.append("### iresnet training step x3, cProfile (cumulative)\n"
                 + python_profile(lambda: pair.step("iresnet"), 3, "cumulative", 30))
    if z is not None:
        prepare_for_inversion(pair)
        anderson = iresnet_inversion(pair.ir_model, "anderson", cfg.inverse_tol, cfg.inverse_tol)
        matched = normflows_inversion(pair.nf_model, cfg.inverse_tol**2)
        parts.append(f"### iresnet Anderson inversion of {len(z):,} points, torch.profiler (self CPU)\n"
                     + torch_profile(lambda: anderson.run(z), 1, 18))
        parts.append(f"### iresnet Anderson inversion of {len(z):,} points, cProfile (tottime)\n"
                     + python_profile(lambda: anderson.run(z), 1, "tottime", 14))
        parts.append(f"### normflows matched fixed-point inversion of {len(z):,} points, torch.profiler (self CPU)\n"
                     + torch_profile(lambda: matched.run(z), 1, 10))
    return "\n\n".join(parts)


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
    if cfg.malloc == "retain" and not retain_freed_memory():
        cfg.malloc = "default (mallopt unavailable)"
    started = time.perf_counter()
    pair = build_pair(cfg)
    train = time_training(pair)
    memory = measure_memory(cfg, pair, argv)
    inversion = None if cfg.skip_inverse else benchmark_inversion(pair)
    print(f"# toy 2-D residual flow: iresnet vs normflows ({datetime.date.today().isoformat()})\n")
    print(report(cfg, train, memory, inversion))
    print(f"- total benchmark wall time {time.perf_counter() - started:.0f} s")
    if cfg.profile:
        print("\n## Profiles\n")
        print(profiles(pair, None if inversion is None else inversion["z"]))


if __name__ == "__main__":
    main()
