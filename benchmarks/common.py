"""What the iresnet-versus-normflows benchmarks share: memory and timing helpers, the tail-length
draws, the training step, the weight copy and the report's header, rows and notes."""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import math
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import normflows as nf
import numpy as np
import torch
from torch import Tensor, nn

import iresnet
from iresnet.core.compiled import memory_lean
from iresnet.core.memory import SavedTensorMeter

MIB, LIBRARIES, COMPILED = 2**20, ("iresnet", "normflows"), "iresnet compiled"
T = TypeVar("T")


def benchmark_parser(doc: str, steps: int, steps_help: str) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first paragraph, with --device, --steps (default ``steps``) and --threads."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=steps, help=steps_help)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--compile", action="store_true", help="add iresnet under torch.compile as a third contender")
    p.add_argument(
        "--precision", choices=["float32", "bf16"], default="float32", help="iresnet's steps in bf16 autocast (CUDA)"
    )
    return p


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line's arguments, with torch's thread count set from --threads."""
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "precision", "float32") == "bf16" and args.device != "cuda":
        parser.error("--precision bf16 is for --device cuda (bfloat16 autocast of the branches)")
    return args


def retain_freed_memory() -> None:
    """Let glibc keep freed memory: otherwise every 5 MB temporary is page-faulted in afresh, and that
    kernel time moved the toy benchmark's ratios by up to 0.25 between runs (it applies to both libraries)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 * MIB)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


class NumpyRoulette(iresnet.Roulette):
    """Roulette drawing its tail length as normflows does (numpy's legacy generator); logs the draws."""

    def __init__(self, rng: np.random.RandomState, draws: list[int], n_exact_terms: int, p: float) -> None:
        super().__init__(n_exact_terms=n_exact_terms, p=p, n_probes=1, memory_efficient=True)
        self.rng, self.draws = rng, draws

    def draw_tail_length(self) -> int:
        self.draws.append(int(self.rng.geometric(self.p, 1)[0]))
        return self.draws[-1]


@torch.no_grad()
def copy_layer(nf_layer: nn.Module, ir_layer: nn.Module, copy_vectors: Callable[[nn.Module, nn.Module], None]) -> None:
    """Copy a normflows ActNorm or residual flow into an iresnet ActNorm or residual block. normflows'
    ActNorm maps data by ``(x - t) e^-s``, iresnet's by ``(x + b) e^s``; both Swish betas are softplus'd;
    ``copy_vectors(nf_mod, ir_mod)`` copies a spectral-normalised layer's power-iteration vectors."""
    if isinstance(ir_layer, iresnet.ActNorm):
        ir_layer.log_scale.copy_(-nf_layer.s.view(-1))
        ir_layer.bias.copy_(-nf_layer.t.view(-1))
        ir_layer.initialized.fill_(True)
        return
    for nf_mod, ir_mod in zip(nf_layer.iresblock.nnet.net, ir_layer.g, strict=True):
        if isinstance(ir_mod, iresnet.LipSwish):
            ir_mod.raw_beta.copy_(nf_mod.beta.view(()))
            continue
        ir_mod.parametrizations.weight.original.copy_(nf_mod.weight)
        ir_mod.bias.copy_(nf_mod.bias)
        copy_vectors(nf_mod, ir_mod)


class FlowPair:
    """Both models, the training batch and an optimiser per library; a subclass builds the models."""

    ir: nn.Module
    nf: nf.NormalizingFlow | nf.MultiscaleFlow
    x: Tensor
    opt: dict[str, torch.optim.Optimizer]
    power_iterations: int

    bf16 = False  # iresnet's forward passes in bfloat16 autocast

    def to_training(self, device: str, lr: float, compile: bool = False, bf16: bool = False) -> None:
        """Move the models and the batch to ``device``, iresnet into training mode, and make the Adam optimisers.
        With ``compile``, a copy of iresnet's model under ``torch.compile`` is a third contender (``COMPILED``)."""
        self.x, self.nf, self.ir = self.x.to(device), self.nf.to(device), self.ir.to(device)
        self.bf16 = bf16
        self.ir.train()
        self.opt = {"iresnet": torch.optim.Adam(self.ir.parameters(), lr)}
        self.opt["normflows"] = torch.optim.Adam(self.nf.parameters(), lr)
        if compile:
            twin = copy.deepcopy(self.ir)
            iresnet.initialize_from_data(twin, self.x)
            self.compiled = torch.compile(twin)
            self.opt[COMPILED] = torch.optim.Adam(twin.parameters(), lr)

    def step(self, library: str, opt: torch.optim.Optimizer | None = None) -> float:
        """One step on the negative log-likelihood (standard normal base) with ``opt`` or the library's
        optimiser; normflows then runs its power iterations. Returns the loss."""
        opt = opt or self.opt[library]
        opt.zero_grad(set_to_none=True)
        if library != "normflows":
            lean = memory_lean() if library == COMPILED else contextlib.nullcontext()
            with lean, torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                z, logdet = (self.ir if library == "iresnet" else self.compiled)(self.x)
            loss = (0.5 * z.pow(2).sum(1) + 0.5 * z.shape[1] * math.log(2 * math.pi) - logdet).mean()
        else:
            loss = self.nf.forward_kld(self.x)
        loss.backward()
        opt.step()
        if library == "normflows":
            nf.utils.update_lipschitz(self.nf, self.power_iterations)
        return loss.item()


def timed(fn: Callable[[], T], device: str) -> tuple[float, T]:
    """The seconds ``fn`` takes (synchronising CUDA around it) and its result."""
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of ``a[i] / b[i]``: pairs run back to back share the machine's speed of the moment."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def time_training(
    steps: dict[str, Callable[[], float]],
    n_steps: int,
    warmup: int,
    device: str,
    draws: list[int],
    nf_draws: Callable[[], list[int]],
) -> tuple[dict[str, list[float]], dict[str, float], bool]:
    """``warmup`` then ``n_steps`` timed rounds of one step per library, interleaved: the times, the last
    losses and whether the tail lengths each round appended to iresnet's ``draws`` always equalled
    ``nf_draws()``, normflows' of its last step."""
    times, losses, draws_match = {k: [] for k in steps}, {}, True
    for i in range(warmup + n_steps):
        before = len(draws)
        for library, step in steps.items():
            seconds, losses[library] = timed(step, device)
            if i >= warmup:
                times[library].append(seconds)
        draws_match &= draws[before:] == nf_draws()
    return times, losses, draws_match


def step_memory(step: Callable[[], object], device: str) -> tuple[int, int]:
    """Peak bytes of the autograd graph in a step and, on CUDA, the allocator's peak increase."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    with SavedTensorMeter() as meter:
        step()
    return meter.peak, torch.cuda.max_memory_allocated() - before if device == "cuda" else 0


def versions(device: str) -> str:
    """torch's and normflows' versions, iresnet's commit, the device and torch's thread count."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return (
        f"torch {torch.__version__}, normflows {nf.__version__}, iresnet {commit.stdout.strip()}, "
        f"device {device}, {torch.get_num_threads()} threads"
    )


def row(label: str, ir: str, nf_: str, ratio: float | None = None, target: str | None = "") -> None:
    """A table row; a ``None`` ratio leaves its cell empty, a ``None`` target leaves out the target column."""
    cells = [label, ir, nf_, "" if ratio is None else f"{ratio:.2f}", *([] if target is None else [target])]
    print(f"| {' | '.join(cells)} |")


def print_notes(notes: list[str]) -> None:
    """The notes under a table, as a list after a blank line."""
    print("\n" + "\n".join(f"- {note}" for note in notes))
