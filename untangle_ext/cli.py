"""Command line: ``untangle-ext {demo,...}``. Each subcommand lives in its own small function."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(results=Path(args.results), cache=Path(args.cache), digits=args.digits, topk=args.topk)
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite of a source checkout (benchmarks/ is not part of the installed package)."""
    import sys

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "suite.py").is_file():
        raise SystemExit(f"untangle-ext bench: no benchmarks/ folder next to the package ({root}); "
                         "run it from a clone of the repository (pip install -e .)")
    sys.path.insert(0, str(root))
    from benchmarks.suite import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="untangle-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="LeNet on the bundled MNIST sample: estimate signals, write heatmaps")
    demo.add_argument("--results", default="results", help="output folder for the figures")
    demo.add_argument("--cache", default=".cache/lenet_mnist.pt", help="trained LeNet checkpoint (reused)")
    demo.add_argument("--digits", type=int, default=4, help="held-out digits to explain")
    demo.add_argument("--topk", type=int, default=3, help="classes per digit")
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", add_help=False,  # its options belong to benchmarks.suite (bench --help)
                           help="benchmark suite (JSON + markdown in benchmarks/results/); `bench --help` lists options")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra  # handed to the suite's own parser
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
