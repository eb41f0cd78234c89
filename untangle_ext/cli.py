"""Command line: ``untangle-ext {demo,...}``. Each subcommand lives in its own small function."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn


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


def load_model(spec: str, checkpoint: Optional[str] = None) -> nn.Module:
    """Build a model from ``module:factory`` (a class or function taking no arguments), load a state_dict
    checkpoint safely (weights only), and put it in eval mode."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"--model must look like 'package.module:factory' (e.g. untangle_ext.models:LeNet), "
                         f"not {spec!r}")
    try:
        factory = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"cannot find {spec!r}: {exc}") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise SystemExit(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            model.load_state_dict(state)
        except Exception as exc:  # a foreign, corrupt or mismatched file: say which
            raise SystemExit(f"cannot load the state_dict in {checkpoint} into {spec}: {exc}") from exc
    return model.eval()


def _user_errors(command):
    """Report a user's mistake (missing file, bad argument, unusable store) as one line, not a traceback."""
    import functools

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"untangle-ext {args.command}: error: {exc}") from exc

    return run


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model factory as module:callable, e.g. untangle_ext.models:LeNet")
    p.add_argument("--checkpoint", help="state_dict file to load into the model (torch.save of model.state_dict())")
    p.add_argument("--store-prefix", required=True,
                   help="signal store prefix; files are {prefix}_class_{c}.pkl (the tutorial's signal_store_path)")
    p.add_argument("--img-size", type=int, nargs=3, default=(1, 28, 28), metavar=("C", "H", "W"),
                   help="input size of the model (default 1 28 28)")


@_user_errors
def _estimate(args: argparse.Namespace) -> int:
    from .compat import UntangleAI

    ua = UntangleAI()
    model = load_model(args.model, args.checkpoint)
    compat_args = argparse.Namespace(mname="cli", batch_size=args.batch_size, img_size=tuple(args.img_size),
                                     data_class=args.classes or None)
    if args.imagenet_dir:
        if not args.synset_map:
            raise SystemExit("--imagenet-dir needs --synset-map (a file whose line i starts with the synset of "
                             "class i)")
        loader = lambda c: ua.load_imagenet_per_class(args.batch_size, args.imagenet_dir, args.synset_map, c,
                                                      args.resnet)[0]
    else:
        loader = lambda c: ua.load_mnist_per_class(args.batch_size, c, data_dir=args.data_dir, download=args.download,
                                                   limit=args.limit)[0]
    written = ua.estimate_signals(model, args.store_prefix, loader, compat_args, overwrite=args.overwrite)
    print(f"{len(written)} signal store(s): {args.store_prefix}_class_{{c}}.pkl for classes {sorted(written)}")
    return 0


def _input_image(args: argparse.Namespace) -> torch.Tensor:
    """The image to explain, (1, C, H, W): a file resized to --img-size, or an image of the bundled MNIST sample."""
    c, h, w = args.img_size
    if args.image:
        import numpy as np
        from PIL import Image

        with Image.open(args.image) as img:
            img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        x = x.unsqueeze(0) if c == 1 else x.permute(2, 0, 1)
        if args.resnet:
            from .loaders import IMAGENET_MEAN, IMAGENET_STD

            x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return x[None]
    from .data import load_mnist_sample

    images, _ = load_mnist_sample("test")
    if not 0 <= args.mnist_index < len(images):
        raise SystemExit(f"--mnist-index must lie in [0, {len(images)}) (the bundled test split)")
    return images[args.mnist_index][None]


@_user_errors
def _attribute(args: argparse.Namespace) -> int:
    from .compat import UntangleAI

    model = load_model(args.model, args.checkpoint)
    x = _input_image(args)
    compat_args = argparse.Namespace(mname="cli", img_size=tuple(args.img_size), topk=args.topk, cmap=args.cmap,
                                     json=args.json, hm_diff=args.hm_diff)
    paths = UntangleAI().attribute_signals(model, x, None, args.store_prefix, None, compat_args, args.out_prefix)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _add_estimate(sub) -> None:
    p = sub.add_parser("estimate", help="estimate per-class signals of a model and write one store per class")
    _model_args(p)
    p.add_argument("--classes", type=int, nargs="*", help="classes to estimate (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data-dir", help="MNIST IDX files (default: $UNTANGLE_EXT_MNIST_DIR, else the bundled sample)")
    p.add_argument("--download", action="store_true", help="download MNIST (sha256-checked) into --data-dir")
    p.add_argument("--limit", type=int, help="at most this many MNIST images per class")
    p.add_argument("--imagenet-dir", help="ImageNet-style folder with one sub-folder per synset (instead of MNIST)")
    p.add_argument("--synset-map", help="with --imagenet-dir: file whose line i starts with the synset of class i")
    p.add_argument("--resnet", action="store_true", help="ImageNet mean/std normalisation (torchvision ResNets)")
    p.add_argument("--overwrite", action="store_true", help="re-estimate classes whose store already exists")
    p.set_defaults(func=_estimate)


def _add_attribute(sub) -> None:
    p = sub.add_parser("attribute", help="explain one image for its top-k classes: JPEG heatmaps or JSON")
    _model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="image file to explain (resized to --img-size)")
    src.add_argument("--mnist-index", type=int, default=0, help="image of the bundled MNIST test split (default 0)")
    p.add_argument("--resnet", action="store_true", help="normalise --image with ImageNet mean/std")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--out-prefix", default="results/image_signals", help="output files are {prefix}_class_{i}.JPEG ...")
    p.add_argument("--cmap", default="seismic")
    p.add_argument("--hm-diff", default="joint", choices=("joint", "single"))
    p.add_argument("--json", action="store_true", help="write {prefix}.json instead of JPEGs")
    p.set_defaults(func=_attribute)


@_user_errors
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


def _add_quality(sub) -> None:
    p = sub.add_parser("quality", help="signal quality rho(S) per layer and image degradation on MNIST")
    p.add_argument("--out", default="results/quality", help="output folder for figures and quality.json")
    p.add_argument("--cache", default=".cache/lenet_mnist.pt", help="trained LeNet checkpoint (reused)")
    p.add_argument("--images", type=int, default=200, help="held-out images for the degradation curves")
    p.add_argument("--patch", type=int, default=4, help="degradation patch size (must divide 28)")
    p.add_argument("--max-neurons", type=int, default=32, help="neurons sampled per layer for rho")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.set_defaults(func=_quality)


@_user_errors
def _inspect(args: argparse.Namespace) -> int:
    from .conditioning import table
    from .store import SignalStore

    for path in args.stores:
        store = SignalStore.load(path)
        print(f"{path}: {store!r}")
        print(f"estimator {args.estimator}; limits: {_limits_text(store.estimator)}")
        print(table(store, args.estimator))
    return 0


def _limits_text(options: dict) -> str:
    if "kappa_max" not in options:
        return "none recorded (store from an older version: κ unknown)"
    return f"dead when κ > {options['kappa_max']:g} or fewer than {options['min_samples']} samples in the regime"


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="per-layer conditioning table of signal stores (neurons, dead, κ, regimes)")
    p.add_argument("stores", nargs="+", help="store files written by estimate / SignalStore.save")
    p.add_argument("--estimator", choices=("a_pos", "a_neg", "a_lin"), default="a_pos",
                   help="which pattern's conditioning to show (a_pos: PatternAttribution/PatternNet's a+)")
    p.set_defaults(func=_inspect)


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
    _add_estimate(sub)
    _add_attribute(sub)
    _add_quality(sub)
    _add_inspect(sub)
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
