"""The ``iresnet`` command line: argument parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iresnet", description="Invertible residual networks and residual flows.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build a residual block, certify, invert it and check its log-det")
    demo.add_argument("--dim", type=int, default=2, help="data dimension (default 2)")
    demo.add_argument("--hidden", type=int, default=64, help="hidden width of the branch (default 64)")
    demo.add_argument("--coeff", type=float, default=0.9, help="spectral norm coefficient c < 1 (default 0.9)")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(dim=args.dim, hidden=args.hidden, coeff=args.coeff, seed=args.seed)
