"""Memory of the log-determinant's graph against the number of series terms.

For each number of terms, one training step of a residual block (MLP 16-512-512-16, batch 512)
with the plain power series (the graph keeps every vector-Jacobian product) and with
``memory_efficient=True`` (Neumann-series gradient computed in the forward pass). Prints the
bytes autograd holds after the forward pass and at its peak (``iresnet.core.memory.SavedTensorMeter``,
any device) and, on CUDA, the allocator's peak.

    python benchmarks/logdet_memory.py [--device cuda]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import iresnet
from iresnet.core.memory import SavedTensorMeter


def block(memory_efficient: bool, n_terms: int, device: torch.device) -> iresnet.ResidualBlock:
    g = nn.Sequential(
        iresnet.spectral_norm(nn.Linear(16, 512), 0.9),
        iresnet.LipSwish(),
        iresnet.spectral_norm(nn.Linear(512, 512), 0.9),
        iresnet.LipSwish(),
        iresnet.spectral_norm(nn.Linear(512, 16), 0.9),
    )
    estimator = iresnet.PowerSeries(n_terms=n_terms, memory_efficient=memory_efficient)
    return iresnet.ResidualBlock(g, estimator).to(device)


def measure(memory_efficient: bool, n_terms: int, device: torch.device) -> tuple[float, float, float | None]:
    torch.manual_seed(0)
    model = block(memory_efficient, n_terms, device)
    x = torch.randn(512, 16, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with SavedTensorMeter() as meter:
        y, logdet = model(x)
        held = meter.current
        (y.pow(2).sum() + logdet.mean()).backward()
    allocator = None
    if device.type == "cuda":
        allocator = (torch.cuda.max_memory_allocated() - start) / 2**20
    return held / 2**20, meter.peak / 2**20, allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--terms", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}; MiB")
    header = "| terms | plain: held | plain: peak | efficient: held | efficient: peak |"
    if device.type == "cuda":
        header += " plain: CUDA peak | efficient: CUDA peak |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for n in args.terms:
        plain, efficient = measure(False, n, device), measure(True, n, device)
        row = f"| {n} | {plain[0]:.1f} | {plain[1]:.1f} | {efficient[0]:.1f} | {efficient[1]:.1f} |"
        if device.type == "cuda":
            row += f" {plain[2]:.1f} | {efficient[2]:.1f} |"
        print(row)


if __name__ == "__main__":
    main()
