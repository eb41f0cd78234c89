"""Distributed estimation benchmark: 1 vs 2 processes (gloo, CPU), and a VGG-16 projection to ImageNet scale.

    python benchmarks/bench_distributed.py                     # both parts, JSON to results/bench_distributed.json
    python benchmarks/bench_distributed.py --skip-vgg          # only the 1 vs 2 process comparison

Part 1 times ``SignalEstimator.fit`` (all 10 classes, one pass) of LeNet over the
bundled MNIST sample (5,000 images) in one process (2 and 1 torch threads) and in
two gloo processes of 1 thread each (ShardSampler shards, float64 all-reduce).
Part 2 times VGG-16 (224x224, random weights: throughput does not depend on them)
in one process: the plain forward, the estimation pass (forward + moments of one
class) and the pattern computation of one class, then projects half of ImageNet.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from untangle_ext import SignalEstimator, distributed
from untangle_ext.data import load_mnist_sample
from untangle_ext.models import LeNet
from untangle_ext.moments import Moments, accumulator_bytes
from untangle_ext.patterns import compute_patterns
from untangle_ext.trace import Program

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
IMAGENET_HALF = 640_000  # about half of the 1.28 M ImageNet training images, as in the paper
CLASSES_IMAGENET = 1000


def lenet_setup(batch_size: int) -> tuple[nn.Module, TensorDataset, int]:
    torch.manual_seed(0)
    return LeNet().eval(), TensorDataset(*load_mnist_sample("all")), batch_size


def time_fit(model: nn.Module, dataset: TensorDataset, batch_size: int) -> dict[str, float]:
    """Seconds of one ``fit`` over this process's share, and of its all-reduce (0 in one process, and when the
    labelled data set lets the ranks split the classes instead of the data)."""
    reduce_s = [0.0]

    def timed_reduce(moments: Moments) -> None:
        t = time.perf_counter()
        distributed.reducer()(moments)
        reduce_s[0] += time.perf_counter() - t

    loader = DataLoader(dataset, batch_size=batch_size, sampler=distributed.ShardSampler(dataset))
    estimator = SignalEstimator(model, progress=False, reducer=timed_reduce)
    estimator.fit(DataLoader(TensorDataset(*dataset[:batch_size]), batch_size=batch_size))  # warm-up
    distributed.barrier()
    reduce_s[0] = 0.0
    start = time.perf_counter()
    estimator.fit(loader)
    distributed.barrier()
    total = time.perf_counter() - start
    return {"seconds": total, "all_reduce_seconds": reduce_s[0]}


def _worker(rank: int, world: int, port: int, batch_size: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    try:
        result = time_fit(*lenet_setup(batch_size))
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_part(batch_size: int) -> list[dict]:
    """LeNet / MNIST 5k: 1 process x 2 threads, 1 process x 1 thread, 2 processes x 1 thread."""
    rows = []
    images = len(load_mnist_sample("all")[0])
    for threads in (2, 1):
        torch.set_num_threads(threads)
        r = time_fit(*lenet_setup(batch_size))
        rows.append({"processes": 1, "threads_each": threads, **r, "images_per_s": images / r["seconds"]})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        mp.spawn(_worker, args=(2, _free_port(), batch_size, str(out)), nprocs=2)
        r = json.loads(out.read_text())
    rows.append({"processes": 2, "threads_each": 1, **r, "images_per_s": images / r["seconds"]})
    return rows


def vgg16(num_classes: int = CLASSES_IMAGENET) -> nn.Sequential:
    """VGG-16 (configuration D) without dropout: 13 conv3x3+ReLU, 5 max-pools, 3 dense layers."""
    layers: list[nn.Module] = []
    c = 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU()]
            c = int(v)
    layers += [nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
               nn.Linear(4096, num_classes)]
    return nn.Sequential(*layers).eval()


@torch.no_grad()
def vgg_part(images: int, batch_size: int) -> dict:
    """Single-process VGG-16 seconds per image: forward, estimation pass (1 class), patterns of 1 class."""
    torch.manual_seed(0)
    model = vgg16()
    program = Program(model)
    batches = [torch.randn(batch_size, 3, 224, 224) for _ in range(max(1, images // batch_size))]
    n = batch_size * len(batches)
    slots = torch.zeros(batch_size, dtype=torch.long)
    model(batches[0])  # warm-up
    forward = _timed(lambda: [model(x) for x in batches])
    moments = Moments(program, 1)
    moments.update(batches[0], slots)  # warm-up (and the shift)
    estimate = _timed(lambda: [moments.update(x, slots) for x in batches])
    patterns = _timed(lambda: [compute_patterns(lm, 0) for lm in moments.layers.values()])
    return {"images_timed": n, "batch_size": batch_size, "threads": torch.get_num_threads(),
            "forward_s_per_image": forward[0] / n, "forward_cpu_s_per_image": forward[1] / n,
            "estimate_s_per_image": estimate[0] / n, "estimate_cpu_s_per_image": estimate[1] / n,
            "patterns_s_per_class": patterns[0], "patterns_cpu_s_per_class": patterns[1],
            "accumulator_bytes_per_class": accumulator_bytes(program)}


def _timed(work) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of ``work()``: the CPU time is what
    the work would take on as many otherwise idle cores as it has threads, when the machine is shared."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def projection(s_per_image: float, s_per_class: float, bytes_per_class: int, processes: int) -> dict:
    """Half of ImageNet through VGG-16 with per-class loaders (each image accumulated once, into its class)."""
    pass_s = IMAGENET_HALF * s_per_image / processes
    patterns_s = CLASSES_IMAGENET * s_per_class  # every rank computes every class's patterns
    return {"processes": processes, "estimation_pass_hours": pass_s / 3600, "patterns_hours": patterns_s / 3600,
            "total_hours": (pass_s + patterns_s) / 3600,
            "all_reduce_terabytes": CLASSES_IMAGENET * bytes_per_class / 1e12,
            "arithmetic": f"{IMAGENET_HALF} images x {s_per_image:.3f} s / {processes} + "
                          f"{CLASSES_IMAGENET} classes x {s_per_class:.2f} s"}


def projections(vgg: dict) -> dict[str, list[dict]]:
    """From the measured wall time, and from CPU time / threads (the same work on idle cores)."""
    idle = lambda key: vgg[key.replace("_s_", "_cpu_s_")] / vgg["threads"]  # noqa: E731
    bytes_ = vgg["accumulator_bytes_per_class"]
    return {
        "measured_wall": [projection(vgg["estimate_s_per_image"], vgg["patterns_s_per_class"], bytes_, p)
                          for p in (1, 2, 4)],
        "idle_cores_from_cpu_time": [projection(idle("estimate_s_per_image"), idle("patterns_s_per_class"), bytes_, p)
                                     for p in (1, 2, 4)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100, help="LeNet batch size")
    parser.add_argument("--vgg-images", type=int, default=4, help="VGG-16 images to time (after a warm-up batch)")
    parser.add_argument("--vgg-batch-size", type=int, default=2)
    parser.add_argument("--skip-vgg", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/bench_distributed.json"))
    args = parser.parse_args()

    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__, "note": "cores shared with other jobs; timings are noisy"}}
    result["lenet_mnist5k"] = processes_part(args.batch_size)
    for row in result["lenet_mnist5k"]:
        print(f"LeNet/MNIST-5k fit, {row['processes']} process(es) x {row['threads_each']} thread(s): "
              f"{row['seconds']:.2f} s ({row['images_per_s']:.0f} images/s; "
              f"all-reduce {row['all_reduce_seconds']:.3f} s)")
    if not args.skip_vgg:
        torch.set_num_threads(os.cpu_count() or 1)
        vgg = result["vgg16_224"] = vgg_part(args.vgg_images, args.vgg_batch_size)
        print(f"VGG-16 224x224, 1 process x {vgg['threads']} threads: "
              f"forward {vgg['forward_s_per_image']:.3f} s/image, "
              f"estimation {vgg['estimate_s_per_image']:.3f} s/image, "
              f"patterns {vgg['patterns_s_per_class']:.2f} s/class, "
              f"accumulators {vgg['accumulator_bytes_per_class'] / 1e9:.2f} GB/class")
        result["projection_half_imagenet"] = projections(vgg)
        for basis, rows in result["projection_half_imagenet"].items():
            for p in rows:
                print(f"  {basis}, {p['processes']} process(es): {p['arithmetic']} = {p['total_hours']:.0f} h")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
