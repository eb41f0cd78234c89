"""Command line: ``untangle-ext {demo,...}``. Each subcommand lives in its own small function."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(results=Path(args.results), cache=Path(args.cache), digits=args.digits, topk=args.topk)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="untangle-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="LeNet on the bundled MNIST sample: estimate signals, write heatmaps")
    demo.add_argument("--results", default="results", help="output folder for the figures")
    demo.add_argument("--cache", default=".cache/lenet_mnist.pt", help="trained LeNet checkpoint (reused)")
    demo.add_argument("--digits", type=int, default=4, help="held-out digits to explain")
    demo.add_argument("--topk", type=int, default=3, help="classes per digit")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
