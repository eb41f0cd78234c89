"""Command line: ``untangle-ext {demo,estimate,attribute,quality,bench}``. Each subcommand lives in its own
small function; every user error leaves as one ``untangle-ext <command>: error: ...`` line (see ``_user_errors``)."""
from __future__ import annotations

import argparse
import functools
import importlib
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from . import validation
from ._version import __version__
from .subsample import check_rate

DESCRIPTION = """\
PatternNet / PatternAttribution explanations for PyTorch image classifiers.

  untangle-ext demo                  LeNet on the bundled MNIST sample: train or reuse, estimate, explain
  untangle-ext estimate  --model M --checkpoint CKPT --store-prefix P     write P_class_{c}.pkl
  untangle-ext attribute --model M --checkpoint CKPT --store-prefix P     explain one image (JPEG / JSON)

Run `untangle-ext <command> --help` for a command's options (defaults are shown)."""


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default when it has a meaningful one (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


class CliError(Exception):
    """A user's mistake on the command line; printed as one error line by :func:`_user_errors`."""


def _user_errors(command):
    """Report a user's mistake (bad option, missing file, unusable store) as one prefixed line, not a traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (CliError, OSError, ValueError, KeyError, TypeError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise SystemExit(f"untangle-ext {args.command}: error: {message}") from exc

    return run


@_user_errors
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(results=Path(args.results), cache=Path(args.cache), digits=args.digits, topk=args.topk)
    return 0


@_user_errors
def _bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite of a source checkout (benchmarks/ is not part of the installed package)."""
    import sys

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "suite.py").is_file():
        raise CliError(f"no benchmarks/ folder next to the package ({root}); run it from a clone of the repository "
                       "(pip install -e .)")
    sys.path.insert(0, str(root))
    from benchmarks.suite import main as bench_main

    return bench_main(args.bench_args)


def load_model(spec: str, checkpoint: Optional[str] = None) -> nn.Module:
    """Build a model from ``module:factory`` (a class or function taking no arguments), load a state_dict
    checkpoint safely (weights only), and put it in eval mode."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"--model must look like 'package.module:factory' (e.g. untangle_ext.models:LeNet), "
                       f"not {spec!r}")
    try:
        factory = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"--model {spec}: cannot find it ({exc})") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint:
        _load_state(model, spec, checkpoint)
    return model.eval()


def _load_state(model: nn.Module, spec: str, checkpoint: str) -> None:
    """Load a ``torch.save(model.state_dict(), path)`` file into ``model``, naming what is wrong with it."""
    if not Path(checkpoint).is_file():
        raise CliError(f"--checkpoint {checkpoint}: no such file")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one holding more than tensors: never unpickle it
        raise CliError(f"--checkpoint {checkpoint}: not a state_dict file of plain tensors (torch.load with "
                       f"weights_only=True refused it: {type(exc).__name__}). Save the weights with "
                       "torch.save(model.state_dict(), path)") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise CliError(f"--checkpoint {checkpoint} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CliError(f"--checkpoint {checkpoint} does not fit --model {spec}: "
                       f"{' '.join(str(exc).split())[:300]} (a checkpoint of another model?)") from exc


def _model_from(args: argparse.Namespace) -> nn.Module:
    """The model of --model with the weights of --checkpoint (or, when asked, its random initial weights)."""
    if args.random_weights:
        print(f"untangle-ext {args.command}: note: --random-weights: {args.model} keeps its untrained initial weights")
    return load_model(args.model, args.checkpoint)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model factory as module:callable, e.g. untangle_ext.models:LeNet")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="state_dict file to load into the model (torch.save of "
                                              "model.state_dict()); e.g. the demo's .cache/lenet_mnist.pt")
    weights.add_argument("--random-weights", action="store_true",
                         help="use the model's untrained initial weights (only for trying the tool out)")
    p.add_argument("--store-prefix", required=True,
                   help="signal store prefix; files are {prefix}_class_{c}.pkl (the tutorial's signal_store_path)")
    p.add_argument("--img-size", type=int, nargs=3, default=(1, 28, 28), metavar=("C", "H", "W"),
                   help="input size of the model")


@_user_errors
def _estimate(args: argparse.Namespace) -> int:
    from .compat import UntangleAI

    ua = UntangleAI()
    check_rate(args.position_rate, "--position-rate")
    model = _model_from(args)
    compat_args = argparse.Namespace(mname="cli", batch_size=args.batch_size, img_size=tuple(args.img_size),
                                     data_class=args.classes or None)
    if args.imagenet_dir:
        if not args.synset_map:
            raise CliError("--imagenet-dir needs --synset-map (a file whose line i starts with the synset of class i)")
        loader = lambda c: ua.load_imagenet_per_class(args.batch_size, args.imagenet_dir, args.synset_map, c,
                                                      args.resnet)[0]
    else:
        if args.data_dir:
            validation.data_folder(args.data_dir, "--data-dir", created=args.download)
        loader = lambda c: ua.load_mnist_per_class(args.batch_size, c, data_dir=args.data_dir, download=args.download,
                                                   limit=args.limit)[0]
    written = ua.estimate_signals(model, args.store_prefix, loader, compat_args, overwrite=args.overwrite,
                                  position_rate=args.position_rate, position_seed=args.position_seed)
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

    images, labels = load_mnist_sample("test")
    if not 0 <= args.mnist_index < len(images):
        raise CliError(f"--mnist-index {args.mnist_index} must lie in [0, {len(images)}) (the bundled test split)")
    print(f"explaining image {args.mnist_index} of the bundled MNIST test split (label {int(labels[args.mnist_index])})")
    return images[args.mnist_index][None]


@_user_errors
def _attribute(args: argparse.Namespace) -> int:
    from .compat import UntangleAI

    from .trace import Program

    model = _model_from(args)
    validation.check_topk(args.topk, Program(model).num_outputs, "--topk")
    x = _input_image(args)
    compat_args = argparse.Namespace(mname="cli", img_size=tuple(args.img_size), topk=args.topk, cmap=args.cmap,
                                     json=args.json, hm_diff=args.hm_diff)
    paths = UntangleAI().attribute_signals(model, x, None, args.store_prefix, None, compat_args, args.out_prefix)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _add_estimate(sub) -> None:
    p = sub.add_parser("estimate", help="estimate per-class signals of a model and write one store per class",
                       formatter_class=_Help)
    _model_args(p)
    p.add_argument("--classes", type=int, nargs="*", help="classes to estimate (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--data-dir", help="folder of MNIST IDX files (must exist; default: $UNTANGLE_EXT_MNIST_DIR, else "
                                      "the bundled 5,000-image sample)")
    p.add_argument("--download", action="store_true", help="download MNIST (sha256-checked) into --data-dir")
    p.add_argument("--limit", type=int, help="at most this many MNIST images per class")
    p.add_argument("--imagenet-dir", help="ImageNet-style folder with one sub-folder per synset (instead of MNIST)")
    p.add_argument("--synset-map", help="with --imagenet-dir: file whose line i starts with the synset of class i")
    p.add_argument("--resnet", action="store_true", help="ImageNet mean/std normalisation (torchvision ResNets)")
    p.add_argument("--overwrite", action="store_true", help="re-estimate classes whose store already exists")
    p.add_argument("--position-rate", type=float, default=1.0,
                   help="fraction in (0, 1] of each conv layer's output positions per image whose statistics are "
                        "accumulated (random, seeded; 1 = all, the exact estimate)")
    p.add_argument("--position-seed", type=int, default=0, help="seed of the --position-rate choice")
    p.set_defaults(func=_estimate)


def _add_attribute(sub) -> None:
    p = sub.add_parser("attribute", help="explain one image for its top-k classes: JPEG heatmaps or JSON",
                       formatter_class=_Help)
    _model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="image file to explain (resized to --img-size)")
    src.add_argument("--mnist-index", type=int, default=0,
                     help="image of the bundled MNIST test split: 100 per digit, sorted by digit (700-799 are 7s)")
    p.add_argument("--resnet", action="store_true", help="normalise --image with ImageNet mean/std")
    p.add_argument("--topk", type=int, default=3, help="explain the k most probable classes")
    p.add_argument("--out-prefix", default="results/image_signals", help="output files are {prefix}_class_{i}.JPEG ...")
    p.add_argument("--cmap", default="seismic", help="matplotlib colormap (a diverging one keeps 0 white)")
    p.add_argument("--hm-diff", default="joint", choices=("joint", "single"),
                   help="joint: the top-k maps share one scale; single: one scale per map")
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
    p = sub.add_parser("quality", help="signal quality rho(S) per layer and image degradation on MNIST",
                       formatter_class=_Help)
    p.add_argument("--out", default="results/quality", help="output folder for figures and quality.json")
    p.add_argument("--cache", default=".cache/lenet_mnist.pt", help="trained LeNet checkpoint (reused)")
    p.add_argument("--images", type=int, default=200, help="held-out images for the degradation curves")
    p.add_argument("--patch", type=int, default=4, help="degradation patch size (must divide 28)")
    p.add_argument("--max-neurons", type=int, default=32, help="neurons sampled per layer for rho")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.set_defaults(func=_quality)


@_user_errors
def _report(args: argparse.Namespace) -> int:
    import time

    from .report import build, mnist_inputs, screenshot

    start = time.perf_counter()
    model = load_model(args.model, args.checkpoint) if args.model else None
    model, stores, loader = mnist_inputs(model, args.store_prefix, args.cache, args.batch_size)
    ready = time.perf_counter()
    report = build(model, stores, loader, args.out, n=args.n, by=args.by, topk=args.topk, batch_size=args.batch_size)
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in report.data["seconds"].items() if k != "total_before_writing")
    print(f"model and stores {ready - start:.1f} s; report {time.perf_counter() - ready:.1f} s ({stages})")
    if args.screenshot:
        print(f"screenshot: {screenshot(report.html, args.screenshot)}")
    print(f"report: {report.html.resolve()}  (numbers: {report.json.name})")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="HTML report explaining the most uncertain and most confident wrong predictions",
                       formatter_class=_Help)
    p.add_argument("--out", default="results/report.html", help="report file; its numbers go to the same name .json")
    p.add_argument("--n", type=int, default=50, help="images per section (most uncertain, most confident wrong)")
    p.add_argument("--by", default="margin", choices=("margin", "entropy"), help="uncertainty measure to rank by")
    p.add_argument("--topk", type=int, default=3, help="classes explained per image (>= 2)")
    p.add_argument("--model", help="model factory as module:callable (default: the demo's LeNet, trained if needed)")
    p.add_argument("--checkpoint", help="with --model: state_dict file to load into the model")
    p.add_argument("--store-prefix", help="signal stores {prefix}_class_{c}.pkl (default: estimate them on the "
                                          "bundled MNIST train split)")
    p.add_argument("--cache", default=".cache/lenet_mnist.pt", help="trained LeNet checkpoint (reused)")
    p.add_argument("--batch-size", type=int, default=250, help="images per forward pass")
    p.add_argument("--screenshot", help="also write a PNG screenshot of the report (needs Chromium)")
    p.set_defaults(func=_report)


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
    p = sub.add_parser("inspect", help="per-layer conditioning table of signal stores (neurons, dead, κ, regimes)",
                       formatter_class=_Help)
    p.add_argument("stores", nargs="+", help="store files written by estimate / SignalStore.save")
    p.add_argument("--estimator", choices=("a_pos", "a_neg", "a_lin"), default="a_pos",
                   help="which pattern's conditioning to show (a_pos: PatternAttribution/PatternNet's a+)")
    p.set_defaults(func=_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="untangle-ext", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    demo = sub.add_parser("demo", help="LeNet on the bundled MNIST sample: estimate signals, write heatmaps",
                          formatter_class=_Help)
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
    _add_report(sub)
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
