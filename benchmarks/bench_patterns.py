"""Patterns per class at memory speed (issue 15 item 1): the native fused op against the PyTorch code.

Per workload, the time of ``compute_patterns`` for one class over every affine layer (float64 moments
→ a_lin, a_pos, a_neg in float32, κ, limits) with the native op and with the PyTorch blocked code
(``_reference.layer_patterns``), and a torch copy of the same bytes
(:func:`~benchmarks.realmodels.pattern_bytes_per_weight` = 40 per weight: three float64 sums read,
the weight read, three float32 patterns written), measured alternating in one run (copy, native,
torch, copy, ...), medians. Bandwidth fraction = bytes / median time / copy rate. Workloads: the
VGG-style net (``models.vgg_style_net``, 18M weights, moments of 32 random 64×64 images) and
VGG-16's fc6 alone (25088 → 4096, 103M weights, moments of 64 random non-negative rows; 2.5 GB of
float64 sums). Writes ``benchmarks/results/patterns.json`` and ``.md``.

A third timed run, ``first touch``, allocates and fills fresh tensors of the patterns' size (12 bytes
per weight): the cost the OS adds to any op that returns new memory this large (glibc maps it anew
each call, the kernel zeroes every page on its first touch). It is in the native and PyTorch times
too; ``native − first touch`` estimates the loop's own memory speed.

    python -m benchmarks.bench_patterns [--threads 1] [--repeats 5] [--torch-repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from untangle_ext import _reference, backend, ops
from untangle_ext.models import vgg_style_net
from untangle_ext.moments import Moments
from untangle_ext.patterns import compute_patterns
from untangle_ext.trace import Program

from .measure import machine_info
from .realmodels import RESULTS, pattern_bytes_per_weight
from .suite import git_revision, write_atomic


def vgg_style_moments(images: int = 32) -> Moments:
    """One class slot of the VGG-style net's moments, from seeded random 3×64×64 images."""
    torch.manual_seed(0)
    moments = Moments(Program(vgg_style_net().eval()), 1)
    x = torch.randn(images, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for i in range(0, images, 16):
        moments.update(x[i:i + 16], torch.zeros(len(x[i:i + 16]), dtype=torch.long))
    return moments


def fc6_moments(rows: int = 64) -> Moments:
    """One class slot of VGG-16's fc6 (Linear 25088 → 4096) alone, from seeded non-negative rows."""
    torch.manual_seed(0)
    moments = Moments(Program(nn.Sequential(nn.Linear(25088, 4096)).eval()), 1)
    x = torch.rand(rows, 25088, generator=torch.Generator().manual_seed(1))
    moments.update(x, torch.zeros(rows, dtype=torch.long))
    return moments


def class_patterns(moments: Moments, impl: Callable) -> float:
    """Seconds of ``compute_patterns`` over every layer of slot 0 with ``impl`` as the pattern op."""
    native, ops.layer_patterns = ops.layer_patterns, impl
    try:
        start = time.perf_counter()
        for lm in moments.layers.values():
            compute_patterns(lm, 0, "all", torch.float32)
        return time.perf_counter() - start
    finally:
        ops.layer_patterns = native


def copy_seconds(nbytes: int) -> Callable[[], float]:
    """A timed torch copy moving ``nbytes`` (read + write) between float64 buffers preallocated once."""
    n = max(1, nbytes // 16)
    src, dst = torch.ones(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    dst.copy_(src)  # first touch outside the timing

    def run() -> float:
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start

    return run


def first_touch_seconds(numel: int) -> float:
    """Seconds to allocate and fill a fresh float32 tensor of ``numel`` values (page faults + zeroing + fill)."""
    start = time.perf_counter()
    torch.empty(numel, dtype=torch.float32).fill_(0.0)
    return time.perf_counter() - start


def measure(name: str, moments: Moments, repeats: int, torch_repeats: int) -> dict:
    """Alternating copy / first touch / native / torch timings of one workload (one warm-up each), and ratios."""
    weights = sum(lm.layer.weight.numel() for lm in moments.layers.values())
    nbytes = pattern_bytes_per_weight() * weights
    runs = {"copy": copy_seconds(nbytes),
            "first_touch": lambda: first_touch_seconds(3 * weights),
            "native": lambda: class_patterns(moments, torch.ops.untangle_ext.layer_patterns),
            "torch": lambda: class_patterns(moments, _reference.layer_patterns)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for k in runs:
        runs[k]()  # warm-up
    for i in range(repeats):
        for k, run in runs.items():
            if k != "torch" or i < torch_repeats:
                times[k].append(run())
    med = {k: statistics.median(v) for k, v in times.items()}
    copy_rate = nbytes / med["copy"]
    return {
        "workload": name, "weights": weights, "bytes": nbytes, "times_s": times, "median_s": med,
        "copy_GBps": copy_rate / 1e9,
        "bandwidth_fraction": {k: nbytes / med[k] / copy_rate for k in ("native", "torch")},
        "native_loop_fraction": nbytes / max(med["native"] - med["first_touch"], 1e-9) / copy_rate,
        "native_speedup": med["torch"] / med["native"],
    }


def markdown(doc: dict) -> str:
    """The per-class pattern table with the issue's targets."""
    m = doc["machine"]
    rows = [f"Commit {doc['commit']}, {m['cpu']}, {doc['threads']} thread(s), torch {m['torch']}, load average "
            f"{doc['load_start'][0]:.1f} at start / {doc['load_end'][0]:.1f} at end; medians of "
            f"{doc['repeats']} alternating repeats (torch path: {doc['torch_repeats']}).", "",
            "| workload | weights | copy of the same bytes | first touch of the outputs | native | native − first "
            "touch | PyTorch code | native speed-up | target |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["workloads"]:
        med, frac = r["median_s"], r["bandwidth_fraction"]
        target = "≥ 50%, ≤ 0.5 s" if r["workload"] == "vgg_style" else "≥ 50%"
        rows.append(f"| {r['workload']} | {r['weights'] / 1e6:.1f}M | "
                    f"{med['copy']:.3f} s ({r['copy_GBps']:.1f} GB/s) | {med['first_touch']:.3f} s | "
                    f"{med['native']:.3f} s ({frac['native']:.0%}) | {r['native_loop_fraction']:.0%} | "
                    f"{med['torch']:.2f} s ({frac['torch']:.0%}) | {r['native_speedup']:.1f}× | {target} |")
    return "\n".join(rows) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_patterns", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable ratios on a shared machine)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--torch-repeats", type=int, default=3, help="repeats of the (slow) PyTorch path, <= --repeats")
    p.add_argument("--workloads", nargs="+", default=["vgg_style", "fc6"], choices=["vgg_style", "fc6"])
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if backend().name != "native":
        raise SystemExit(f"the native backend is needed to compare it: {backend().reason}")
    torch.set_num_threads(args.threads)
    doc = {"schema": "untangle_ext-patterns/1", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "commit": git_revision(), "machine": machine_info(), "threads": args.threads, "repeats": args.repeats,
           "torch_repeats": min(args.torch_repeats, args.repeats), "load_start": list(os.getloadavg()),
           "workloads": []}
    build = {"vgg_style": vgg_style_moments, "fc6": fc6_moments}
    for name in args.workloads:
        moments = build[name]()
        doc["workloads"].append(measure(name, moments, args.repeats, doc["torch_repeats"]))
        del moments
    doc["load_end"] = list(os.getloadavg())
    out = Path(args.out_dir)
    write_atomic(out / "patterns.json", json.dumps(doc, indent=1))
    write_atomic(out / "patterns.md", markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
