"""Issue 15 item 6: conv statistics from a random subset of output positions (``position_rate``).

For LeNet on the bundled MNIST sample (trained, cached in .cache/) and the VGG-style net (seeded
random weights, seeded random 3×64×64 images as in benchmarks/workloads.py), per rate r:

* throughput: streaming estimation (``Moments.update``, the per-batch work of a fit) and the plain
  forward pass (``model(x)`` under no_grad), timed ALTERNATING in one run (forward, r=1, r=0.5, ...
  per round), medians over the rounds; the accumulators are allocated and warmed (shifts fixed)
  outside the timed region;
* per layer (VGG's widest conv): the full native op (what a per-position mask inside it would cost
  at best: its weight-gradient convolution is dense over positions), the sampled path (gather +
  Linear op) and the forward convolution alone;
* quality against r = 1: PatternAttribution maps (per map ‖A_r − A_1‖ / ‖A_1‖, top-1 class of the
  full model, held-out images) and ρ(S_a±) per layer (all-class stores fitted on split A, ρ from
  splits B/C as in ``untangle-ext quality``; VGG: conv layers only, fc1's 16384² systems do not fit).

Run: ``python -m benchmarks.bench_subsample [--quick] [--threads 1] [--repeats 5]``; writes
``benchmarks/results/subsample.json`` and ``.md`` (``--out`` to change). Timings on a shared
machine are noisy: compare the ratios, and read the load average recorded with them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

from untangle_ext import Attributor, SignalEstimator
from untangle_ext import ops
from untangle_ext._io import atomic_write
from untangle_ext.data import load_mnist_sample
from untangle_ext.models import load_or_train_lenet
from untangle_ext.moments import Moments
from untangle_ext.quality.rho import signal_quality
from untangle_ext.store import ALL_CLASSES
from untangle_ext.subsample import PositionSampler
from untangle_ext.trace import Program

from . import workloads as W
from .measure import machine_info, summarize

RATES = (1.0, 0.5, 0.25, 0.1, 0.05)
VGG_CFG = {"vgg_width_div": 1, "vgg_size": 64}
TARGET = {"throughput_vs_forward": 0.5, "map_error": 1e-2, "rho_change": 0.01}


def _alternating(fns: dict[str, tuple[Callable[[], object], Callable[[], None]]], rounds: int) -> dict[str, list]:
    """Time each ``run`` once per round in turn (``setup`` first, untimed); the seconds per name."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (setup, run) in fns.items():
            state = setup()
            start = time.perf_counter()
            run(state)
            times[name].append(time.perf_counter() - start)
            del state
    return times


def throughput(model: torch.nn.Module, data: list, slots: int, rates: Sequence[float], rounds: int) -> dict:
    """Images/s of the forward pass and of estimation at each rate, alternating; ratios to the forward."""
    program = Program(model)
    images = sum(xb.shape[0] for xb, _ in data)

    def estimation(rate: float):
        def setup() -> Moments:
            m = Moments(program, slots, PositionSampler(rate))
            m.update(data[0][0][:8], data[0][1][:8])  # warm-up: allocates, fixes the shifts
            return m
        return setup, lambda m: [m.update(xb, yb) for xb, yb in data]

    def forward(_) -> None:
        with torch.no_grad():
            for xb, _ in data:
                model(xb)

    fns = {"forward": (lambda: None, forward), **{f"r={r:g}": estimation(r) for r in rates}}
    times = _alternating(fns, rounds)
    out = {name: summarize(t, images) for name, t in times.items()}
    for name in out:
        out[name]["vs_forward"] = out[name]["rate"] / out["forward"]["rate"]
    return out


def layer_paths(model: torch.nn.Module, x: torch.Tensor, layer_index: int, rates: Sequence[float],
                rounds: int) -> dict:
    """One conv layer: full native op vs sampled gather + Linear op vs the forward conv, alternating (s per batch)."""
    program = Program(model)
    layer = program.layers[layer_index]
    captured = {}

    def grab(lay, inp):
        if lay is layer:
            captured["x"] = inp
        return lay.forward(inp)

    with torch.no_grad():
        program.forward(x, affine=grab)
    inp = captured["x"]
    slots = torch.zeros(inp.shape[0], dtype=torch.long)

    def fresh(rate: float):
        def setup():
            moments = Moments(program, 1, PositionSampler(rate))
            m = moments.layers[layer.name]
            m.init_shift(inp)
            return m, (moments.sampler.image_keys(x) if moments.sampler else None)
        return setup

    fns = {"forward conv": (lambda: None, lambda _: layer.forward(inp))}
    for r in rates:
        fns[f"full op (r=1)" if r == 1 else f"sampled r={r:g}"] = (fresh(r), lambda s: s[0].accumulate(inp, slots, s[1]))
    with torch.no_grad():
        times = _alternating(fns, rounds)
    return {"layer": layer.name, "weight": list(layer.weight.shape), "input": list(inp.shape),
            **{name: statistics.median(t) for name, t in times.items()}}


def quality(model, rates: Sequence[float], map_stores: Callable, rho_store: Callable, images: torch.Tensor,
            split_b: torch.Tensor, split_c: torch.Tensor, layers=None, chunk: int = 16) -> dict:
    """Per rate (one rate's stores in memory at a time): PatternAttribution map difference to r = 1 per map
    (‖A_r − A_1‖ / ‖A_1‖, top-1 class of the model) and ρ(S_a±) per layer, with its largest change from r = 1."""
    with torch.no_grad():
        target = model(images).argmax(1)
    exact, maps, rho = None, {}, {}
    for r in rates:  # r = 1 first
        a = Attributor(model, map_stores(r)).attribute(images, target=target).flatten(1)
        exact = a if exact is None else exact
        err = (a - exact).norm(dim=1) / exact.norm(dim=1).clamp(min=1e-30)
        maps[f"{r:g}"] = {"median": float(err.median()), "max": float(err.max())}
        q = signal_quality(model, rho_store(r), split_b, split_c, estimators=["S_a±"], progress=False,
                           layers=layers, chunk=chunk)
        rho[f"{r:g}"] = {name: v["S_a±"]["rho"] for name, v in q.items()}
    change = {r: max(abs(v[n] - rho["1"][n]) for n in v) for r, v in rho.items()}
    return {"maps": maps, "rho": rho, "max_abs_change": change}


def lenet_quality(rates: Sequence[float], test_images: int) -> dict:
    """LeNet (trained) on the bundled sample: per-class stores (4,000 images) → maps; all-class stores
    (split A, 2,000 images) → ρ on splits B / test."""
    model, accuracy = load_or_train_lenet(".cache/lenet_mnist.pt", progress=False)
    x_train, y_train = load_mnist_sample("train")
    x_test, _ = load_mnist_sample("test")
    perm = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(0))
    half_a, half_b = perm[: len(perm) // 2], perm[len(perm) // 2:]

    def per_class(r: float):
        loader = DataLoader(TensorDataset(x_train, y_train), batch_size=128)
        return SignalEstimator(model, progress=False, position_rate=r).fit(loader)

    def all_class(r: float):
        loader = DataLoader(TensorDataset(x_train[half_a], y_train[half_a]), batch_size=128)
        return SignalEstimator(model, per_class=False, progress=False, position_rate=r).fit(loader)[ALL_CLASSES]

    return {"model": {"name": "LeNet (trained)", "held_out_accuracy": accuracy, "map_images": test_images},
            **quality(model, rates, per_class, all_class, x_test[:test_images], x_train[half_b], x_test)}


def lenet_fewer_images(fractions: Sequence[float], test_images: int) -> dict:
    """The other way to do less work: every position, but a random ``fraction`` of the images (LeNet, same
    stores and metrics as :func:`lenet_quality`; map error and ρ change against all the images)."""
    model, _ = load_or_train_lenet(".cache/lenet_mnist.pt", progress=False)
    x_train, y_train = load_mnist_sample("train")
    x_test, _ = load_mnist_sample("test")
    perm = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(0))
    half_a, half_b = perm[: len(perm) // 2], perm[len(perm) // 2:]
    pick = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(1))

    def subset(idx: torch.Tensor, f: float) -> torch.Tensor:
        keep = pick[pick < len(idx)][: round(f * len(idx))] if f < 1 else torch.arange(len(idx))
        return idx[keep.sort().values]

    def per_class(f: float):
        idx = subset(torch.arange(x_train.shape[0]), f)
        return SignalEstimator(model, progress=False).fit(DataLoader(TensorDataset(x_train[idx], y_train[idx]), 128))

    def all_class(f: float):
        idx = subset(half_a, f)
        loader = DataLoader(TensorDataset(x_train[idx], y_train[idx]), batch_size=128)
        return SignalEstimator(model, per_class=False, progress=False).fit(loader)[ALL_CLASSES]

    return quality(model, fractions, per_class, all_class, x_test[:test_images], x_train[half_b], x_test)


def vgg_quality(rates: Sequence[float], train: int, test: int, rho_images: int) -> dict:
    """VGG-style (random weights, random images): one all-class store per rate (per-class fc1 stores would not
    fit in memory here) → maps and ρ of the conv layers (fc1's 16384² systems do not fit either)."""
    model = W.vgg()
    x, y = W.images("vgg", train + test + 2 * rho_images, VGG_CFG)
    loader = DataLoader(TensorDataset(x[:train], y[:train]), batch_size=64)
    last: dict = {}

    def fit(r: float):
        if r not in last:
            last.clear()  # one store in memory
            last[r] = SignalEstimator(model, per_class=False, progress=False, position_rate=r).fit(loader)[ALL_CLASSES]
        return last[r]

    conv = [layer.name for layer in Program(model).layers if layer.kind.startswith("conv")]
    b, c = x[train + test:train + test + rho_images], x[train + test + rho_images:]
    return {"model": {"name": "VGG-style (random weights)", "train_images": train, "map_images": test,
                      "rho_images": rho_images},
            **quality(model, rates, fit, fit, x[train:train + test], b, c, layers=conv, chunk=4)}


def smallest_rate(result: dict, rates: Sequence[float]) -> Optional[float]:
    """The smallest r meeting the three VGG targets (throughput, maps, ρ), or None."""
    ok = []
    for r in rates:
        key = f"{r:g}"
        t = result["throughput"]["vgg"][f"r={key}"]["vs_forward"]
        q = result["quality"]["vgg"]
        if t >= TARGET["throughput_vs_forward"] and q["maps"][key]["max"] <= TARGET["map_error"] \
                and q["max_abs_change"][key] <= TARGET["rho_change"]:
            ok.append(r)
    return min(ok) if ok else None


def markdown(result: dict, rates: Sequence[float]) -> str:
    """The README table: per workload and rate, throughput vs forward, map error and ρ change."""
    lines = [f"Machine: {result['machine']['cpu']}, {result['threads']} thread(s), load average "
             f"{result['loadavg_before']} → {result['loadavg_after']}; rounds: {result['rounds']}.", "",
             "| model | r | estimation img/s | × forward | map error median / max | max \\|Δρ(S_a±)\\| per layer |",
             "|---|---|---|---|---|---|"]
    for name in ("lenet", "vgg"):
        th, q = result["throughput"][name], result["quality"][name]
        lines.append(f"| {name} forward | – | {th['forward']['rate']:.0f} | 1 | – | – |")
        for r in rates:
            k = f"{r:g}"
            e = th[f"r={k}"]
            lines.append(f"| {name} | {k} | {e['rate']:.0f} | {e['vs_forward']:.2f} | "
                         f"{q['maps'][k]['median']:.1e} / {q['maps'][k]['max']:.1e} | {q['max_abs_change'][k]:.4f} |")
    lp = result["layer_paths"]
    lines += ["", f"VGG layer {lp['layer']} (weight {lp['weight']}, input {lp['input']}), seconds per batch: " +
              ", ".join(f"{k} {v:.3f}" for k, v in lp.items() if isinstance(v, float)),
              "", f"Smallest r meeting every VGG target: {result['smallest_rate']}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run, numbers not meaningful)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps ratios stable under load)")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds of the timings")
    p.add_argument("--out", default="benchmarks/results/subsample", help="output path without extension")
    p.add_argument("--fewer-images-only", action="store_true",
                   help="only the LeNet baseline 'all positions, fewer images' (writes <out>-fewer-images.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fewer_images_only:
        result = {"fraction_of_images": lenet_fewer_images(RATES, 200), "loadavg": list(os.getloadavg())}
        path = Path(f"{args.out}-fewer-images.json")
        atomic_write(path, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
        print(json.dumps(result["fraction_of_images"]["maps"]), json.dumps(result["fraction_of_images"]["max_abs_change"]))
        return 0
    rates = RATES
    quick = args.quick
    result: dict = {"machine": machine_info(), "threads": args.threads, "rounds": args.repeats,
                    "loadavg_before": [round(v, 1) for v in os.getloadavg()], "targets": TARGET,
                    "backend": ops.backend().name}
    start = time.perf_counter()
    x, y = W.images("lenet", 256 if quick else 1024, {})
    vx, vy = W.images("vgg", 16 if quick else 64, VGG_CFG)
    result["throughput"] = {
        "lenet": throughput(W.lenet(), W.batches(x, y, 256), W.NUM_CLASSES, rates, args.repeats),
        # one slot: fc1's accumulators are 400 MB per class
        "vgg": throughput(W.vgg(), W.batches(vx, torch.zeros_like(vy), 64), 1, rates, args.repeats),
    }
    print("throughput done", round(time.perf_counter() - start), "s", flush=True)
    result["layer_paths"] = layer_paths(W.vgg(), vx, 1, rates, args.repeats)
    print("layer paths done", round(time.perf_counter() - start), "s", flush=True)
    result["quality"] = {"lenet": lenet_quality(rates, 50 if quick else 200)}
    print("lenet quality done", round(time.perf_counter() - start), "s", flush=True)
    result["quality"]["vgg"] = vgg_quality(rates, 64 if quick else 256, 8 if quick else 32, 32 if quick else 128)
    result["smallest_rate"] = smallest_rate(result, rates)
    result["loadavg_after"] = [round(v, 1) for v in os.getloadavg()]
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    atomic_write(out.with_suffix(".md"), lambda f: f.write(markdown(result, rates).encode()))
    print(markdown(result, rates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
