"""Quantus metrics for PatternAttribution, the gradient and Captum's IntegratedGradients on LeNet / MNIST.

Offline, on the bundled sample: reuses the demo's LeNet (``.cache/lenet_mnist.pt``, trained if absent),
estimates the signals on the training split, then scores explanations of held-out digits (5 per class
by default) with three Quantus metrics and prints a markdown table (README "Ecosystem" section)::

    python examples/quantus_table.py [--per-class 5] [--out results/quantus_table.md]

Needs the [ecosystem] extra (Quantus, Captum).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import quantus
import torch

from untangle_ext import SignalEstimator
from untangle_ext._io import atomic_write
from untangle_ext.captum import quantus_explain
from untangle_ext.data import load_mnist_sample
from untangle_ext.loaders import load_mnist_per_class
from untangle_ext.models import load_or_train_lenet

# (name shown, explain_func, its kwargs): our explain_func for our methods, Quantus' own Captum path for IG
METHODS = (
    ("PatternAttribution", "pattern_attribution"),
    ("gradient", "gradient"),
    ("IntegratedGradients (Captum)", None),
)


def metrics(seed: int, runs: int = 50) -> dict[str, tuple[quantus.Metric, str]]:
    """The three metrics, with what 'better' means for each."""
    quiet = {"disable_warnings": True, "display_progressbar": False}
    return {
        "FaithfulnessCorrelation": (quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=56, perturb_baseline="mean",
                                                                    return_aggregate=False, **quiet), "higher"),
        "RandomLogit": (quantus.RandomLogit(num_classes=10, seed=seed, **quiet), "lower"),
        "MaxSensitivity": (quantus.MaxSensitivity(nr_samples=10, lower_bound=0.1, **quiet), "lower"),
    }


def explain_kwargs(method: str | None, stores) -> tuple:
    """(explain_func, explain_func_kwargs) for one row of the table."""
    if method is None:
        return quantus.explain, {"method": "IntegratedGradients"}
    return quantus_explain, {"stores": stores, "method": method}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Print (and with --out write) the table; returns {method: {metric: mean score}}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=5, help="held-out images per class (default 5)")
    parser.add_argument("--cache", default=".cache/lenet_mnist.pt", help="LeNet checkpoint (the demo's; reused)")
    parser.add_argument("--train-per-class", type=int, help="estimate on this many training images per class "
                                                             "(default: all 400)")
    parser.add_argument("--runs", type=int, default=50, help="random pixel subsets of FaithfulnessCorrelation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the markdown table to this file")
    opts = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed)
    model, accuracy = load_or_train_lenet(Path(opts.cache))
    stores = SignalEstimator(model, progress=False).fit(load_mnist_per_class(256, limit=opts.train_per_class)[0])
    images, labels = load_mnist_sample("test")
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:opts.per_class] for c in range(10)])
    x, y = images[keep].numpy(), labels[keep].numpy()
    table = {}
    for name, method in METHODS:
        func, kwargs = explain_kwargs(method, stores)
        table[name] = {}
        for metric_name, (metric, _) in metrics(opts.seed, opts.runs).items():
            scores = metric(model=model, x_batch=x, y_batch=y, device="cpu", explain_func=func,
                            explain_func_kwargs=kwargs)
            table[name][metric_name] = float(np.nanmean(np.asarray(scores, dtype=np.float64)))
    header = "| method | " + " | ".join(f"{m} ({better} is better)" for m, (_, better) in metrics(0).items()) + " |"
    rows = [header, "|" + "---|" * (1 + len(metrics(0)))]
    rows += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in scores.values()) + " |" for name, scores in table.items()]
    text = "\n".join(rows) + "\n"
    print(text + f"\nLeNet held-out accuracy {accuracy:.2%}; {len(x)} held-out images; "
          f"{time.perf_counter() - start:.1f} s")
    if opts.out:
        atomic_write(opts.out, lambda f: f.write(text.encode()))
    return table


if __name__ == "__main__":
    main()
