"""Benchmark: training throughput of the same multi-scale image flow in iresnet and in normflows.

The flow part of a Residual Flows MNIST model on (batch, 1, 28, 28) float32 batches: 3 scales
(1 x 28 x 28, 2 x 14 x 14, 4 x 7 x 7), each BLOCKS x [ActNorm, residual block] with the branch
``Swish, 3x3 conv(c, 64), Swish, 1x1 conv(64, 64), Swish, 3x3 conv(64, c)`` (normflows'
``LipschitzCNN`` order; spectral-norm coefficient 0.98; last layer not zero-initialised), and
between scales a squeeze and half the channels factored out to a standard normal. normflows
expresses it exactly with ``MultiscaleFlow``, ``Squeeze`` and channel ``Merge`` (plus an identity
transform with a per-sample zero log-det: without it ``MultiscaleFlow`` cannot start with an
ActNorm); iresnet with ``MultiScale``, the flow part of ``image_flow`` (without its dequantisation
and logit). Roulette log-det (2 exact terms, geometric(0.5) tail, 1 Hutchinson probe, Neumann
gradient in the forward pass), Adam, batch 64. The data: synthetic MNIST-like 8-bit images
(smoothed noise, about 85 % black), dequantised and logit-transformed (alpha 0.05) once, untimed.

For a fair comparison normflows' weights, Swish betas, ActNorm parameters and power-iteration
vectors (converged, then copied) are copied into iresnet and the two maps are compared in eval
mode on the CPU; iresnet draws its tail lengths from numpy like normflows (the draws are
compared); both run 5 power iterations per step. BLOCKS = 4 keeps the defaults near 1.5 minutes
on 2 CPU cores (a step took 2.4 s per library with 1 thread); the papers' MNIST models have 16.

    python benchmarks/image_flow_vs_normflows.py [--device cuda] [--steps 15] [--batch-size 64] [--threads 2]
"""

from __future__ import annotations

import math
import statistics
from functools import partial

import normflows as nf
import numpy as np
import torch
import torch.nn.functional as F
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
from iresnet.data import Logit, UniformDequantize
from iresnet.flows.multiscale import MultiScale

SHAPE, SCALES, BLOCKS, HIDDEN, COEFF, N_EXACT, GEOM_P, POWER_ITERATIONS = (1, 28, 28), 3, 4, 64, 0.98, 2, 0.5, 5
STAGES = [(SHAPE[0] * 2**i, SHAPE[1] // 2**i, SHAPE[2] // 2**i) for i in range(SCALES)]  # squeeze, keep half
WARMUP, LR, SEED, CONVERGE_ITERATIONS = 2, 1e-3, 0, 500
INDUCED = nf.nets.InducedNormConv2d


def mnist_like(batch: int) -> Tensor:
    """Integer images in 0..255 (smoothed noise, mostly black), dequantised and logit-transformed."""
    field = F.avg_pool2d(torch.randn(batch, 1, SHAPE[1] + 4, SHAPE[2] + 4), 5, stride=1)  # std 0.2
    images = (255 * (5 * field - 1)).clamp(0, 255).round()
    return Logit(0.05)(UniformDequantize(256)(images)[0])[0]


def branch_layers(c: int) -> list[tuple[int, int, int]]:
    """(in channels, out channels, kernel) of the branch's three convolutions."""
    return [(c, HIDDEN, 3), (HIDDEN, HIDDEN, 1), (HIDDEN, c, 3)]


class ZeroLogDet(nf.flows.Flow):
    """The identity with a (batch,) zero log-det, as the transform MultiscaleFlow applies first: it
    starts its sum from the first flow's log-det, and the scalar of an ActNorm cannot take the
    residual blocks' (batch,) ones in place."""

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z, z.new_zeros(len(z))

    inverse = forward


def build_normflows() -> nf.MultiscaleFlow:
    """normflows' flow lists run latent -> data and its level j is scale SCALES - 1 - j, so a level's
    list starts with the squeeze and each ActNorm follows its residual block."""
    q0, levels = [], []
    for scale in reversed(range(SCALES)):
        c = STAGES[scale][0]
        flows: list[nn.Module] = [nf.flows.Squeeze()] if scale < SCALES - 1 else []
        for _ in range(BLOCKS):
            channels, kernels = [c, HIDDEN, HIDDEN, c], [k for *_, k in branch_layers(c)]
            net = nf.nets.LipschitzCNN(channels, kernels, COEFF, POWER_ITERATIONS, init_zeros=False)
            flows.append(nf.flows.Residual(net, reduce_memory=True, n_exact_terms=N_EXACT, geom_p=GEOM_P, n_samples=1))
            flows.append(nf.flows.ActNorm((c, 1, 1)))
        levels.append(flows)
        q0.append(nf.distributions.DiagGaussian(STAGES[min(scale + 1, SCALES - 1)], trainable=False))
    merges = [nf.flows.Merge() for _ in range(SCALES - 1)]
    return nf.MultiscaleFlow(q0, levels, merges, ZeroLogDet(), class_cond=False)


def nf_stages(nf_model: nf.MultiscaleFlow) -> list[list[nn.Module]]:
    """normflows' ActNorms and residual flows of each scale in data -> latent order."""
    levels = reversed(nf_model.flows)
    return [[f for f in reversed(level) if not isinstance(f, nf.flows.Squeeze)] for level in levels]


def build_iresnet(rng: np.random.RandomState, draws: list[int]) -> MultiScale:
    stages = []
    for c, _, _ in STAGES:
        layers: list[nn.Module] = []
        for _ in range(BLOCKS):
            g = nn.Sequential()
            for c_in, c_out, k in branch_layers(c):
                conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
                g.extend([iresnet.LipSwish(), iresnet.spectral_norm(conv, COEFF, POWER_ITERATIONS)])
            layers += [iresnet.ActNorm(c), iresnet.ResidualBlock(g, NumpyRoulette(rng, draws, N_EXACT, GEOM_P))]
        stages.append(iresnet.Sequential(*layers))
    return MultiScale(stages, SHAPE, squeeze_first=False, factor_out=True)


def copy_vectors(nf_mod: nn.Module, ir_mod: nn.Module, h: int, w: int) -> None:
    """normflows' power iteration runs on the operator of a kxk convolution (vectors ``v`` in, ``u``
    out) but on the channel matrix of a 1x1 one; iresnet's on the operator always (``u`` in, ``v``
    out): a channel vector spread evenly over the image is the same vector, and 1x1 convolutions keep
    it spread evenly, so the two iterations agree up to rounding (torch's float32 norm of 784 copies
    of a channel vector errs by about 1e-5 relative, so the two sigmas of a 1x1 layer drift about
    1.5e-5 apart once iresnet iterates)."""
    if nf_mod.kernel_size == (1, 1):
        spread = torch.full((1, 1, h, w), 1 / math.sqrt(h * w))
        u, v = nf_mod.v.view(1, -1, 1, 1) * spread, nf_mod.u.view(1, -1, 1, 1) * spread
    else:
        u, v = nf_mod.v.view(1, -1, h, w).clone(), nf_mod.u.view(1, -1, h, w).clone()
    # assigning the buffers sets the input shape: iresnet's first call will not reconverge them
    norm = ir_mod.parametrizations.weight[0]
    norm.u, norm.v = u, v


def copy_weights(nf_model: nf.MultiscaleFlow, ir_model: MultiScale) -> None:
    """normflows' layers, scale by scale in data -> latent order, into iresnet's (``common.copy_layer``)."""
    for (_, h, w), nf_layers, ir_stage in zip(STAGES, nf_stages(nf_model), ir_model.stages, strict=True):
        for nf_layer, ir_layer in zip(nf_layers, ir_stage, strict=True):
            copy_layer(nf_layer, ir_layer, partial(copy_vectors, h=h, w=w))


@torch.no_grad()
def nf_map(nf_model: nf.MultiscaleFlow, x: Tensor) -> Tensor:
    """Data -> latent without log-det, the factored-out parts first as iresnet concatenates them (the
    first call initialises normflows' ActNorms and power iterations)."""
    parts = []
    for j in reversed(range(len(nf_model.q0))):
        for f in reversed(nf_model.flows[j]):
            x = f.iresblock.forward(x) if isinstance(f, nf.flows.Residual) else f.inverse(x)[0]
        if j > 0:
            (x, factored), _ = nf_model.merges[j - 1].inverse(x)
            parts.append(factored.flatten(1))
    return torch.cat([*parts, x.flatten(1)], 1)


@torch.no_grad()
def ir_map(ir_model: MultiScale, x: Tensor) -> Tensor:
    """Data -> latent without log-det (no tail draws); call it in eval mode (no power iteration)."""
    blocks = [m for m in ir_model.modules() if isinstance(m, iresnet.ResidualBlock)]
    estimators = [b.logdet for b in blocks]
    for b in blocks:
        b.logdet = None
    try:
        return ir_model(x)[0]
    finally:
        for b, estimator in zip(blocks, estimators, strict=True):
            b.logdet = estimator


def normalised_weights(nf_model: nf.MultiscaleFlow, ir_model: MultiScale) -> list[tuple[Tensor, Tensor]]:
    ir_convs = [m for m in ir_model.modules() if isinstance(m, nn.Conv2d)]
    nf_convs = [m for stage in nf_stages(nf_model) for f in stage for m in f.modules() if isinstance(m, INDUCED)]
    return [(ir.weight, n.compute_weight(update=False)) for ir, n in zip(ir_convs, nf_convs, strict=True)]


class Pair(FlowPair):
    """Both models with identical functions, their optimisers and the training batch."""

    power_iterations = POWER_ITERATIONS

    def __init__(self, device: str, batch: int, compile: bool = False, bf16: bool = False) -> None:
        torch.manual_seed(SEED)
        self.x = mnist_like(batch)
        self.nf = build_normflows()
        nf_map(self.nf, self.x)  # normflows' data-dependent ActNorm initialisation and spatial sizes
        nf.utils.update_lipschitz(self.nf, CONVERGE_ITERATIONS)
        sigma = [(m.scale.item(), m.compute_one_iter().item()) for m in self.nf.modules() if isinstance(m, INDUCED)]
        self.sigma_change = max(abs(b - a) / a for a, b in sigma)
        self.rng, self.draws = np.random.RandomState(SEED), []
        self.ir = build_iresnet(self.rng, self.draws).eval()
        copy_weights(self.nf, self.ir)
        with torch.no_grad():  # on the CPU, whatever the device: CUDA convolutions may round to TF32
            self.weight_difference = max((a - b).abs().max().item() for a, b in normalised_weights(self.nf, self.ir))
            z = nf_map(self.nf, self.x)
            self.difference, self.z_scale = (ir_map(self.ir, self.x) - z).abs().max().item(), z.abs().max().item()
        np.random.seed(SEED)
        self.to_training(device, LR, compile, bf16)

    def nf_draws(self) -> list[int]:
        """normflows' tail lengths of its last step, in iresnet's block order."""
        return [int(f.iresblock.last_n_samples[0]) for s in nf_stages(self.nf) for f in s if hasattr(f, "iresblock")]


def main() -> None:
    p = benchmark_parser(__doc__, 15, "timed training steps per library (default 15)")
    p.add_argument("--batch-size", type=int, default=64, help="default 64, the papers' batch size")
    args = parse_args(p)
    retain_freed_memory()
    print(versions(args.device) + ("; iresnet in bf16 autocast" if args.precision == "bf16" else ""), flush=True)
    print(f"{SCALES} scales x {BLOCKS} x [ActNorm, residual block], hidden {HIDDEN}, batch {args.batch_size}\n")

    pair = Pair(args.device, args.batch_size, args.compile, args.precision == "bf16")
    steps = {k: partial(pair.step, k) for k in (*LIBRARIES, *[COMPILED] * args.compile)}
    warmup = timed(steps[COMPILED], args.device)[0] if args.compile else None
    times, losses, draws_match = time_training(steps, args.steps, WARMUP, args.device, pair.draws, pair.nf_draws)
    peaks = {k: step_memory(step, args.device) for k, step in steps.items()}

    print("| measurement | iresnet | normflows | ratio iresnet / normflows |\n|---|---|---|---|")
    contenders = [k for k in times if k != "normflows"]
    for library in contenders:
        pair_times = [times[library], times["normflows"]]
        label = f"training step{', compiled' if library == COMPILED else ''}, median of {args.steps} (ms)"
        row(label, *(f"{1e3 * statistics.median(v):.1f}" for v in pair_times), paired_ratio(*pair_times), None)
    if warmup is not None:
        row("compile warm-up: the first compiled step (s)", f"{warmup:.1f}", "", None, None)
    memory = {"autograd saved tensors (parameters included), peak in a step": 0}
    if args.device == "cuda":
        memory["CUDA max_memory_allocated increase in a step"] = 1
    for label, i in memory.items():
        for library in contenders:
            a, b = peaks[library][i], peaks["normflows"][i]
            name = f"{label}{', compiled' if library == COMPILED else ''} (MiB)"
            row(name, f"{a / MIB:.1f}", f"{b / MIB:.1f}", a / b, None)
    notes = [
        "the ratio is the median of back-to-back ratios; step min / max (ms): "
        + ", ".join(f"{k} {1e3 * min(v):.1f} / {1e3 * max(v):.1f}" for k, v in times.items()),
        f"same function (eval mode, copied weights and power-iteration vectors): max abs(z_iresnet - z_normflows) "
        f"{pair.difference:.1e} (max abs(z) {pair.z_scale:.1f}); normalised conv weights differ by at most "
        f"{pair.weight_difference:.1e}; {CONVERGE_ITERATIONS} power iterations before the copy, after which one more "
        f"changes a sigma by at most {pair.sigma_change:.1e} (relative)",
        f"same tail draws at every step: {draws_match}; last losses {losses['iresnet']:.4f} / "
        f"{losses['normflows']:.4f} (the probes differ, and normflows' is the Neumann surrogate, not the log-det)",
    ]
    if COMPILED in times:
        notes.append(
            "the compiled contender draws its tail lengths on the device (no host sync), not from normflows' "
            "numpy stream: its steps do the same work on average, not step by step"
        )
    print_notes(notes)
    if pair.difference > 1e-4 * max(1.0, pair.z_scale):
        print("\nWARNING: the two models do not compute the same function: the comparison is not valid")


if __name__ == "__main__":
    main()
