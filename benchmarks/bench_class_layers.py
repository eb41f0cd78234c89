"""Issue 13 item 3, measured before building: class-specific patterns only in the last N affine layers.

For N = 0 (all-class patterns everywhere), 1, 2 and all layers, per-class stores of LeNet/MNIST are
rebuilt in memory with the all-class patterns below the last N layers. Reported: bytes per class
(float16 a_pos of the class-specific layers; the shared layers are stored once), the normwise map
difference to full per-class stores, and the degradation AUC (PatternAttribution maps of the predicted
class, 4×4 patches replaced by 0, most relevant first; lower = the maps find the evidence faster).
Run: ``python benchmarks/bench_class_layers.py`` (writes ``results/bench_class_layers.json``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from untangle_ext import Attributor, SignalEstimator, SignalStore
from untangle_ext.data import load_mnist_sample, mnist_sample_loader
from untangle_ext.models import load_or_train_lenet
from untangle_ext.quality import degradation_curve, patch_scores


def hybrid(per_class: dict[int, SignalStore], shared: SignalStore, names: list[str], n: int) -> dict:
    """Per-class stores whose layers below the last ``n`` carry the all-class patterns."""
    own = set(names[len(names) - n:])
    return {c: SignalStore(c, {l: (s.patterns[l] if l in own else shared.patterns[l]) for l in names}, s.layers,
                           s.fingerprint, s.num_samples, s.estimator, s.library_version, s.input_shape)
            for c, s in per_class.items()}


def main() -> dict:
    model, _ = load_or_train_lenet(".cache/lenet_mnist.pt", epochs=2, progress=False)
    per_class = SignalEstimator(model, progress=False).fit(mnist_sample_loader(128, split="train"))
    shared = SignalEstimator(model, per_class=False, progress=False).fit(mnist_sample_loader(128, split="train"))
    shared = next(iter(shared.values()))
    names = [layer["name"] for layer in shared.layers]
    sizes = {layer["name"]: 2 * torch.Size(layer["weight_shape"]).numel() for layer in shared.layers}
    x, _ = load_mnist_sample("test")
    x = x[:300]
    full = Attributor(model, per_class).attribute(x)
    out = {}
    for n in [0, 1, 2, len(names)]:
        maps = Attributor(model, hybrid(per_class, shared, names, n)).attribute(x)
        diff = (maps - full).flatten(1).norm(dim=1) / full.flatten(1).norm(dim=1).clamp(min=1e-30)
        curve = degradation_curve(model, x, patch_scores(maps, 4), 4, fill=0.0)
        out[f"N={n}" + (" (all)" if n == len(names) else "")] = {
            "class_specific_layers": names[len(names) - n:],
            "bytes_per_class_float16": sum(sizes[l] for l in names[len(names) - n:]),
            "map_difference_median": float(diff.median()), "map_difference_max": float(diff.max()),
            "degradation_auc": curve.auc}
    return out


if __name__ == "__main__":
    res = main()
    Path("results").mkdir(exist_ok=True)
    Path("results/bench_class_layers.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
