"""Issue 13 measurements: store bytes and map error of the v2 formats (LeNet/MNIST), lazy attribution timing.

Run: ``python benchmarks/bench_store_v2.py`` (writes ``results/bench_store_v2.json``). Timings come
from whatever machine runs it; on a shared machine they are noisy.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from untangle_ext import Attributor, SignalEstimator, SignalStore
from untangle_ext.data import load_mnist_sample, mnist_sample_loader
from untangle_ext.models import load_or_train_lenet
from untangle_ext.store import PATTERN_KEYS, class_store_path, layer_signature, model_fingerprint
from untangle_ext.trace import Program


def _median_s(fn, repeats: int = 15) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def formats(out: Path) -> dict:
    """Bytes per class file and normwise map error (top-3, 200 held-out digits) of each storage choice."""
    model, _ = load_or_train_lenet(".cache/lenet_mnist.pt", epochs=2, progress=False)
    stores = SignalEstimator(model, progress=False).fit(mnist_sample_loader(128, split="train"))
    x, _ = load_mnist_sample("test")
    x = x[:200]
    exact = Attributor(model, stores).explain(x, topk=3).attributions
    result = {}
    for label, dtype, keep in [("v1-equivalent: a_lin+a_pos+a_neg float32", torch.float32, PATTERN_KEYS),
                               ("a_pos float32", torch.float32, ("a_pos",)),
                               ("a_pos bfloat16", torch.bfloat16, ("a_pos",)),
                               ("a_pos float16 (default)", torch.float16, ("a_pos",))]:
        paths = {c: s.save(out / f"{dtype}_{len(keep)}_class_{c}.pkl", dtype=dtype, keep=keep)
                 for c, s in stores.items()}
        maps = Attributor(model, {c: SignalStore.load(p) for c, p in paths.items()}).explain(x, topk=3).attributions
        err = (maps - exact).flatten(2).norm(dim=2) / exact.flatten(2).norm(dim=2).clamp(min=1e-30)
        result[label] = {"bytes_per_class": paths[0].stat().st_size, "map_error_max": float(err.max()),
                         "map_error_median": float(err.median())}
    old = out / "v1_class_0.pkl"
    torch.save(stores[0].to_dict(), old)
    result["v1 file (torch.save, today)"] = {"bytes_per_class": old.stat().st_size}
    return result


def lazy(out: Path, classes: int = 1000) -> dict:
    """First and warm explain(topk=3) with 1,000 stores on disk (LRU) vs 3 stores in memory."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, classes)).eval()
    program = Program(model)
    fp, sig = model_fingerprint(model), layer_signature(program)
    for c in range(classes):  # random patterns: the timing does not depend on their values
        if class_store_path(out / "k", c).exists():  # resumed from an earlier, interrupted run
            continue
        pats = {l.name: {"a_pos": torch.randn_like(l.weight), "n_pos": torch.ones(l.out_features, dtype=torch.float64),
                         "n": torch.tensor(2.0, dtype=torch.float64)} for l in program.layers}
        SignalStore(c, pats, sig, fp, 2, input_shape=[1, 28, 28]).save(class_store_path(out / "k", c))
    x = torch.randn(1, 1, 28, 28)
    top3 = model(x).topk(3).indices[0].tolist()
    eager = Attributor(model, {c: SignalStore.load(class_store_path(out / "k", c)) for c in top3})
    t = time.perf_counter()
    lazy_attr = Attributor.from_prefix(model, out / "k", cache_size=64)
    first = lazy_attr.explain(x, topk=3)
    first_s = time.perf_counter() - t
    assert torch.equal(first.attributions, eager.explain(x, topk=3).attributions)
    others = [torch.randn(1, 1, 28, 28) for _ in range(15)]
    it = iter(others * 100)
    return {
        "disk_bytes_per_class": class_store_path(out / "k", 0).stat().st_size,
        "first_explain_s (incl. constructing, fingerprint, 3-4 loads)": first_s,
        "warm_explain_lazy_same_image_s": _median_s(lambda: lazy_attr.explain(x, topk=3)),
        "warm_explain_lazy_new_images_s (LRU warm after 15)": (
            [lazy_attr.explain(o, topk=3) for o in others], _median_s(lambda: lazy_attr.explain(next(it), topk=3)))[1],
        "explain_3_stores_in_memory_s": _median_s(lambda: eager.explain(x, topk=3)),
        "cached_classes": len(lazy_attr.lazy.cached), "cache_size": 64,
        "bytes_per_cached_class": sum(v.numel() * v.element_size() for p in eager.stores[top3[0]].patterns.values()
                                      for v in p.values()),
    }


if __name__ == "__main__":
    import sys

    with tempfile.TemporaryDirectory() as d:
        where = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(d)  # bench_store_v2.py [lazy|formats|all] [dir]
        part = sys.argv[1] if len(sys.argv) > 1 else "all"
        res = {}
        if part in ("formats", "all"):
            res["formats (LeNet/MNIST)"] = formats(where)
        if part in ("lazy", "all"):
            res["lazy attribution"] = lazy(where)
    Path("results").mkdir(exist_ok=True)
    Path(f"results/bench_store_v2_{part}.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
