"""Precision of the float32 pattern estimation against the same formula in float64 (issue 11).

    python -m benchmarks.precision                 # LeNet + bundled MNIST, batch 16 and 256, every option
    python -m benchmarks.precision --options before after --timing   # plus the cost of the shift options
    python -m benchmarks.precision_cost --before OLD_TREE            # the cost against an older tree

For every affine layer the estimator's own float32 inputs (and its float32 gates) are
recorded while it runs; the reference evaluates eq. 4 / eq. 8 on those inputs in float64
(centred, no shift). Errors are normwise per neuron, ``max_k |a_k - r_k| / |r_k|``:

* ``a_lin``: against the float64 a_lin;
* ``a+``: against the float64 a⁺ evaluated with the estimator's float32 gates (arithmetic error);
* ``flip``: float64 a⁺ with float32 gates against float64 a⁺ with float64 gates: the share caused
  by samples whose ``y + b`` is within float32 rounding of 0 (their gate differs); no shift or
  product dtype can remove it.

Shift options (the library keeps only the chosen one, ``after``; the others are measured here):
``before`` (first batch's mean everywhere), ``none``, ``offset`` (mean where |mean| > spread),
``zeros`` (mean only where the first batch has no exact zeros), each optionally with float64
products where the library uses them (``+f64``, :func:`untangle_ext.moments.wide_products`), and ``all-f64`` (float64 products everywhere).
Every option runs on the ops as they are: Linear products in float64, conv products summed in float32
over chunks of ``untangle_ext._reference.CHUNK_SAMPLES`` samples (the numbers without them, at commit
17e90c3, are README's "before" columns).
"""
from __future__ import annotations

import argparse
import contextlib
import time
from typing import Callable, Iterator

import torch

from untangle_ext.conditioning import Limits
from untangle_ext.data import load_mnist_sample
from untangle_ext.layers import AffineLayer
from untangle_ext.models import load_or_train_lenet
from untangle_ext.moments import LayerMoments, Moments, wide_products
from untangle_ext.patterns import compute_patterns
from untangle_ext.trace import Program

from . import workloads

#: Precision is measured on every neuron: no conditioning limit zeroes a pattern here.
NO_LIMITS = Limits(kappa_max=1e300, min_samples=1)
ShiftRule = Callable[[torch.Tensor, list], torch.Tensor]


def _mean(x: torch.Tensor, dims: list) -> torch.Tensor:
    return x.mean(dims)


def _none(x: torch.Tensor, dims: list) -> torch.Tensor:
    return x.new_zeros([s for i, s in enumerate(x.shape) if i not in dims])


def _offset(x: torch.Tensor, dims: list) -> torch.Tensor:
    mean, std = x.mean(dims), x.std(dims) if x[0].numel() * x.shape[0] > 1 else x.mean(dims) * 0
    return torch.where(mean.abs() > std, mean, torch.zeros_like(mean))


def _zeros(x: torch.Tensor, dims: list) -> torch.Tensor:
    mean = x.mean(dims)
    return torch.where((x == 0).sum(dims) > 0, torch.zeros_like(mean), mean)


RULES: dict[str, ShiftRule] = {"before": _mean, "none": _none, "offset": _offset, "zeros": _zeros}


@contextlib.contextmanager
def option(name: str) -> Iterator[None]:
    """Run the estimator under one option: ``after`` is the library as it is; the rest patch the shift rule."""
    if name == "after":
        yield
        return
    rule_name, _, f64 = name.partition("+")
    f64_all = rule_name == "all-f64"
    rule = RULES["none" if f64_all else rule_name]
    saved_init, saved_acc = LayerMoments.init_shift, LayerMoments.accumulate

    def init_shift(self, x):
        self.set_shift(rule(x, self.layer.shift_dims(x)) if x.numel() else x.new_zeros(self.layer.in_features))
        self.product_dtype = torch.float64 if (f64_all or (f64 and _small(self.layer))) else x.dtype

    LayerMoments.init_shift = init_shift
    try:
        yield
    finally:
        LayerMoments.init_shift, LayerMoments.accumulate = saved_init, saved_acc


def _small(layer: AffineLayer) -> bool:
    return wide_products(layer)


def _rows(layer: AffineLayer, t: torch.Tensor) -> torch.Tensor:
    """A layer output (N, K, *out) or (N, ..., K) as (samples, K)."""
    if t.dim() > 2 and not layer.kind == "linear":
        t = t.movedim(1, -1)
    return t.reshape(-1, t.shape[-1])


def reference(layer: AffineLayer, x: torch.Tensor, z32: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 4 and eq. 8 (E[y] over all samples) in float64 on ``x``: a_lin, a⁺ with float64 and with float32 gates."""
    assert layer.groups == 1, "the benchmark's reference handles ungrouped layers"
    xs = layer.patches(x.double())
    xs = xs.reshape(-1, xs.shape[-1])
    w = layer.weight.double().reshape(layer.out_features, -1)
    y = xs @ w.t()
    m = xs.mean(0)
    xc = xs - m
    yc = y - y.mean(0)
    out = {"a_lin": _norm((xc.t() @ yc / xs.shape[0]).t(), w)}
    for key, gate in (("a_pos64", (y + layer.bias.double()) > 0), ("a_pos32", _rows(layer, z32) > 0)):
        g = gate.double()
        n = g.sum(0).clamp(min=1)
        sxy = xc.t() @ (g * yc)  # (D, K)
        cov = (sxy + m.unsqueeze(1) * (g * yc).sum(0)) / n  # E+[x y~] with E[y~] = 0: eq. 8
        out[key] = _norm(cov.t(), w)
    return out


def _norm(cov: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    den = (w * cov).sum(1, keepdim=True)
    return torch.where(den.abs() > 0, cov / den, torch.zeros_like(cov))


def normwise(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max over live neurons of |a_k - ref_k| / |ref_k|."""
    a, ref = a.reshape(ref.shape[0], -1).double(), ref.reshape(ref.shape[0], -1)
    live = ref.norm(dim=1) > 0
    return float(((a - ref).norm(dim=1)[live] / ref.norm(dim=1)[live]).max()) if live.any() else 0.0


def measure(model: torch.nn.Module, images: torch.Tensor, batch: int, name: str) -> dict[str, dict[str, float]]:
    """Errors per layer of one option at one batch size."""
    program = Program(model)
    seen: dict[str, list] = {layer.name: [] for layer in program.layers}
    with option(name):
        mom = Moments(program, 1)
        for i in range(0, images.shape[0], batch):
            x = images[i:i + batch]
            slots = torch.zeros(x.shape[0], dtype=torch.long)

            def affine(layer, inp):
                z = mom.layers[layer.name].accumulate(inp, slots)
                seen[layer.name].append((inp.clone(), z.clone()))
                return z

            program.forward(x, affine=affine)
        pats = {name_: compute_patterns(lm, 0, limits=NO_LIMITS) for name_, lm in mom.layers.items()}
    result = {}
    for layer in program.layers:
        x = torch.cat([s[0] for s in seen[layer.name]])
        z = torch.cat([s[1] for s in seen[layer.name]])
        ref = reference(layer, x, z)
        p = pats[layer.name]
        result[layer.name] = {"a_lin": normwise(p["a_lin"], ref["a_lin"]), "a+": normwise(p["a_pos"], ref["a_pos32"]),
                              "flip": normwise(ref["a_pos32"], ref["a_pos64"])}
    return result


def throughput(model: torch.nn.Module, images: torch.Tensor, batch: int, name: str, repeats: int) -> float:
    """Images per second of the estimation pass (moments only), median of ``repeats``."""
    program = Program(model)
    rates = []
    with option(name):
        for _ in range(repeats + 1):
            mom = Moments(program, 10)
            labels = torch.arange(images.shape[0]) % 10
            t0 = time.perf_counter()
            for i in range(0, images.shape[0], batch):
                mom.update(images[i:i + batch], labels[i:i + batch])
            for lm in mom.layers.values():
                lm.flush()
            rates.append(images.shape[0] / (time.perf_counter() - t0))
    return sorted(rates[1:])[len(rates[1:]) // 2]


def offset_error(name: str) -> float:
    """SPEC §2: a_lin/a⁺ of data with mean/std = 1e4 against the float64 reference (max normwise)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4).eval()
    x = 1e4 + torch.randn(4000, 8)
    program = Program(lin)
    with option(name):
        mom = Moments(program, 1)
        zs = [mom.layers[program.layers[0].name].accumulate(x[i:i + 500], torch.zeros(500, dtype=torch.long))
              for i in range(0, 4000, 500)]
        p = compute_patterns(mom.layers[program.layers[0].name], 0, limits=NO_LIMITS)
    ref = reference(program.layers[0], x, torch.cat(zs))
    return max(normwise(p["a_lin"], ref["a_lin"]), normwise(p["a_pos"], ref["a_pos32"]))


def table(results: dict, batches: list[int], options: list[str]) -> str:
    """Markdown: one row per layer × estimator, one column per option × batch."""
    cols = [(o, b) for o in options for b in batches]
    head = "| layer | estimator | " + " | ".join(f"{o} b{b}" for o, b in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    layers = list(results[cols[0]].keys())
    for layer in layers:
        for est in ("a_lin", "a+", "flip"):
            vals = " | ".join(f"{results[c][layer][est]:.1e}" for c in cols)
            lines.append(f"| {layer} | {est} | {vals} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="+", default=["before", "none", "offset", "zeros", "offset+f64",
                                                          "all-f64", "after"])
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 256])
    parser.add_argument("--images", type=int, default=1000, help="test images of the bundled MNIST sample")
    parser.add_argument("--timing", action="store_true", help="also time estimation on LeNet and VGG-style")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, acc = load_or_train_lenet(".cache/lenet_mnist.pt", progress=False)
    images = load_mnist_sample("test")[0][:args.images]
    print(f"LeNet (held-out accuracy {acc:.3f}), {images.shape[0]} test images; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    results = {(o, b): measure(model, images, b, o) for o in args.options for b in args.batches}
    print(table(results, args.batches, args.options))
    print("\nSPEC §2 offset data (mean/std 1e4), max normwise a_lin/a+: "
          + ", ".join(f"{o} {offset_error(o):.1e}" for o in args.options))
    if args.timing:
        vgg_images = torch.randn(16, 3, 64, 64)
        for label, net, data, batch in (("LeNet b256", model, images, 256), ("LeNet b16", model, images[:256], 16),
                                         ("VGG-style b16", workloads.vgg(), vgg_images, 16)):
            rates = {o: throughput(net, data, batch, o, repeats=2) for o in args.options}
            print(f"estimation throughput {label} (img/s, median of 2 after a warm-up): "
                  + ", ".join(f"{o} {r:.1f}" for o, r in rates.items()))


if __name__ == "__main__":
    main()
