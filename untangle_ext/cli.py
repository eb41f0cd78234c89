"""Command line: ``untangle-ext {demo,...}``. Each subcommand lives in its own small function."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(results=Path(args.results), cache=Path(args.cache), digits=args.digits, topk=args.topk)
    return 0


def _quality(args: argparse.Namespace) -> int:
    from .quality.report import run_quality

    result = run_quality(out=Path(args.out), cache=Path(args.cache), images=args.images, patch=args.patch,
                         max_neurons=args.max_neurons, seed=args.seed)
    for layer, by_est in result["rho"].items():
        print(f"rho {layer:>14}: " + "  ".join(f"{e} {v['rho']:.3f}" for e, v in by_est.items()))
    for exp, aucs in result["auc"].items():
        print(f"AUC {exp:>14}: " + "  ".join(f"{n} {a:.3f}" for n, a in aucs.items()))
    print(f"wrote rho.png, degradation.png, quality.json to {Path(args.out).resolve()}/ "
          f"in {result['seconds']['total']:.1f} s")
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
    quality = sub.add_parser("quality", help="signal quality rho(S) per layer and image degradation on MNIST")
    quality.add_argument("--out", default="results/quality", help="output folder for figures and quality.json")
    quality.add_argument("--cache", default=".cache/lenet_mnist.pt", help="trained LeNet checkpoint (reused)")
    quality.add_argument("--images", type=int, default=200, help="held-out images for the degradation curves")
    quality.add_argument("--patch", type=int, default=4, help="degradation patch size (must divide 28)")
    quality.add_argument("--max-neurons", type=int, default=32, help="neurons sampled per layer for rho")
    quality.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    quality.set_defaults(func=_quality)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
