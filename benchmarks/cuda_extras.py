"""GPU-only measurements: the bits/dim drift of bf16 training against float32, and whether a
CUDA-graphed compiled training step works.

- ``--drift``: the digits preset trained for --steps steps twice from the same seed, with
  ``precision=float32`` and ``precision=bf16``; the test bits/dim of each and their difference.
- ``--cuda-graphs``: the toy benchmark's flow (16 blocks, 2-128-128-2, batch 512) with a fixed
  number of series terms (a CUDA graph needs static shapes and no host sync; the roulette's
  device-drawn loop has a data-dependent trip count), compiled with ``mode="default"`` and with
  ``mode="reduce-overhead"`` (CUDA graphs): the median step of each, and whether Inductor skipped
  the CUDA graph (and why).

    python benchmarks/cuda_extras.py --drift --cuda-graphs [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch._dynamo.utils import counters

import iresnet
from iresnet.models import toy_flow
from iresnet.train import resolve_config, train


def drift(steps: int) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for precision in ("float32", "bf16"):
            settings = {"steps": steps, "device": "cuda", "precision": precision, "out": f"{root}/{precision}"}
            settings.update(eval_every=steps, checkpoint_every=steps, eval_size=2000)
            results[precision] = train(resolve_config("digits", None, [settings]), progress=False).evaluation
    print(f"| precision | test bits/dim after {steps} steps (digits preset, seed 0) |\n|---|---|")
    for precision, evaluation in results.items():
        print(f"| {precision} | {evaluation.bits_per_dim:.4f} +- {evaluation.bits_per_dim_se:.4f} |")
    change = results["bf16"].bits_per_dim - results["float32"].bits_per_dim
    print(f"\n- bf16 - float32: {change:+.4f} bits/dim\n")


def step_times(mode: str, steps: int = 30) -> tuple[float, int]:
    """The median step (ms) of the compiled flow and how many CUDA-graph skips Inductor counted."""
    torch.manual_seed(0)
    model = toy_flow(2, blocks=16, hidden=128, logdet={"name": "series", "n_terms": 4, "memory_efficient": True})
    model = model.cuda()
    x = torch.randn(512, 2, device="cuda")
    iresnet.initialize_from_data(model, x)
    compiled = torch.compile(model, mode=mode)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    counters.clear()
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        (-compiled(x).mean()).backward()
        opt.step()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), sum(
        counters["inductor"].get(k, 0) for k in counters["inductor"] if "skip" in k
    )


def cuda_graphs() -> None:
    print("| torch.compile mode | training step, median (ms) | CUDA-graph skips counted |\n|---|---|---|")
    for mode in ("default", "reduce-overhead"):
        try:
            ms, skips = step_times(mode)
            print(f"| {mode} | {ms:.2f} | {skips} |")
        except Exception as error:  # a report, not a test: say what failed and go on
            print(f"| {mode} | failed: {type(error).__name__}: {str(error).splitlines()[0][:200]} | |")
        torch._dynamo.reset()
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drift", action="store_true", help="bits/dim of bf16 against float32 training")
    p.add_argument("--cuda-graphs", action="store_true", help="a CUDA-graphed compiled step")
    p.add_argument("--steps", type=int, default=300, help="training steps of each --drift run")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("cuda_extras: no CUDA device, nothing measured (these measurements are GPU-only)")
        return
    if args.drift:
        drift(args.steps)
    if args.cuda_graphs:
        cuda_graphs()


if __name__ == "__main__":
    main()
