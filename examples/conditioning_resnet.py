"""Conditioning on a trained residual net (ResNet-18 layout, bundled MNIST at 32×32) beside LeNet (issue 11).

    .venv/bin/python examples/conditioning_resnet.py [--width 16] [--epochs 1] [--images 200]

Trains (once; cached under .cache/) a ResNet-18-layout net: 3×3 stem, four stages of two
BasicBlocks (widths w, 2w, 4w, 8w; w = 64 is torchvision's, the default 16 keeps training to a
few minutes on 2 CPU cores), global average pool, linear. Then, for it and the tutorial LeNet:
per-class stores with the default conditioning limits and without any (``kappa_max`` = 1e300,
``min_samples`` = 1), the κ table of class 0 (a⁺), and the degradation / deletion AUCs
(``untangle_ext.quality``; smaller = the ranking finds the evidence sooner) of
PatternAttribution and PatternNet (with ``estimator="positive"``, a⁺ in every layer, and ``"gated"``,
a⁺ only where the layer's output feeds a ReLU), gradient, input×gradient and a random ranking, plus
the largest |map| value.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from untangle_ext import Attributor, SignalEstimator
from untangle_ext.conditioning import table
from untangle_ext.data import load_mnist_sample
from untangle_ext.models import BasicBlock, load_or_train_lenet
from untangle_ext.quality.degradation import degradation_curve, patch_scores
from untangle_ext.store import atomic_torch_save

#: Row label -> (method, estimator, multiply by the input); None: a random ranking.
METHODS = {
    "pattern_attribution": ("pattern_attribution", "positive", False),
    "pattern_attribution, gated": ("pattern_attribution", "gated", False),
    "patternnet": ("patternnet", "positive", False),
    "patternnet, gated": ("patternnet", "gated", False),
    "gradient": ("gradient", "positive", False),
    "input_x_gradient": ("gradient", "positive", True),
    "random": None,
}
NO_LIMITS = {"kappa_max": 1e300, "min_samples": 1}


def resnet18_layout(width: int = 16, num_classes: int = 10) -> nn.Sequential:
    """ResNet-18 layout for 1×32×32 inputs: stem, [2, 2, 2, 2] BasicBlocks, average pool, linear."""
    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    c = width
    for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [BasicBlock(c, planes, stride=1 if i == 0 else 2), BasicBlock(planes, planes)]
        c = planes
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def mnist32(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled MNIST split, zero-padded to 32×32."""
    x, y = load_mnist_sample(split)
    return F.pad(x, (2, 2, 2, 2)), y


def load_or_train_resnet(path: Path, width: int, epochs: int) -> tuple[nn.Module, float]:
    """Train with Adam (batch 64, seed 0) on the 4,000 training images, or load the cached weights."""
    torch.manual_seed(0)
    model = resnet18_layout(width)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        x, y = mnist32("train")
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(x.shape[0])
            for i in range(0, x.shape[0], 64):
                idx = order[i:i + 64]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        atomic_torch_save(model.state_dict(), path)
    model.eval()
    xt, yt = mnist32("test")
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).double().mean())
    return model, acc


def aucs(model: nn.Module, stores, images: torch.Tensor) -> dict[str, tuple[float, float, float]]:
    """(degradation AUC, deletion AUC, max |map|) per row of :data:`METHODS`, for each image's predicted class."""
    attributor, fill, out = Attributor(model, stores), images.mean(), {}
    for name, how in METHODS.items():
        if how is None:
            m = torch.rand(images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        else:
            method, estimator, times_input = how
            m = attributor.attribute(images, method=method, estimator=estimator).double()
            m = m * images if times_input else m
        deg = degradation_curve(model, images, patch_scores(m, 4), 4, fill).auc
        dele = degradation_curve(model, images, patch_scores(m, 1), 1, 0.0, points=25).auc
        out[name] = (deg, dele, float(m.abs().max()))
    return out


def report(label: str, model: nn.Module, fit_x: torch.Tensor, fit_y: torch.Tensor, images: torch.Tensor) -> None:
    loader = [(fit_x[i:i + 100], fit_y[i:i + 100]) for i in range(0, fit_x.shape[0], 100)]
    t0 = time.perf_counter()
    stores = SignalEstimator(model, progress=False).fit(loader)
    raw = SignalEstimator(model, progress=False, **NO_LIMITS).fit(loader)
    print(f"\n## {label}: estimation {time.perf_counter() - t0:.0f} s (twice, {fit_x.shape[0]} images)")
    print(f"class 0 store: {stores[0]!r}")
    print("κ table of a⁺, class 0 (default limits):")
    print(table(stores[0], "a_pos"))
    with_limits, without = aucs(model, stores, images), aucs(model, raw, images)
    print("\n| method | degradation AUC | deletion AUC | max |map| | degr. AUC, no limits | del. AUC, no limits "
          "| max |map|, no limits |\n|---|---|---|---|---|---|---|")
    for name in METHODS:
        a, b = with_limits[name], without[name]
        print(f"| {name} | {a[0]:.3f} | {a[1]:.3f} | {a[2]:.3g} | {b[0]:.3f} | {b[1]:.3f} | {b[2]:.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="first stage width (torchvision's ResNet-18: 64)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--images", type=int, default=200, help="held-out images for the AUCs")
    parser.add_argument("--fit", type=int, default=2000, help="training images for the estimation")
    args = parser.parse_args()
    cache = Path(".cache")
    resnet, acc = load_or_train_resnet(cache / f"resnet18_mnist32_w{args.width}_e{args.epochs}.pt", args.width,
                                       args.epochs)
    lenet, lenet_acc = load_or_train_lenet(cache / "lenet_mnist.pt", progress=False)
    print(f"ResNet-18 layout (width {args.width}, {args.epochs} epoch(s)): held-out accuracy {acc:.3f}; "
          f"LeNet: {lenet_acc:.3f}")
    gen = torch.Generator().manual_seed(0)
    x28, y = load_mnist_sample("train")
    fit = torch.randperm(x28.shape[0], generator=gen)[:args.fit]
    test28 = load_mnist_sample("test")[0][:args.images]
    report("LeNet", lenet, x28[fit], y[fit], test28)
    report("ResNet-18 layout", resnet, F.pad(x28[fit], (2, 2, 2, 2)), y[fit], F.pad(test28, (2, 2, 2, 2)))


if __name__ == "__main__":
    main()
