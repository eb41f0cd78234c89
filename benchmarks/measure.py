"""Timing, FLOP counting, memory and machine-info helpers shared by every benchmark task."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn


def summarize(times: list[float], units: float) -> dict:
    """Median/min/max seconds of the repeats and the throughput ``units / median`` (and its range)."""
    med = statistics.median(times)
    return {
        "repeats": len(times), "units": units, "median_s": med, "min_s": min(times), "max_s": max(times),
        "rate": units / med, "rate_min": units / max(times), "rate_max": units / min(times),
    }


def time_repeats(fn: Callable[[], object], units: float, repeats: int, warmup: int = 1) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` timed times; summarize (rate = units/s)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return summarize(times, units)


def gemm_rate(n: int = 2048, repeats: int = 10, warmup: int = 3) -> dict:
    """fp32 ``torch.mm`` n×n rate of this machine (after warm-up); ``rate`` in FLOP/s."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    result = time_repeats(lambda: torch.mm(a, b, out=out), 2.0 * n ** 3, repeats, warmup)
    result["n"] = n
    return result


def forward_profile(model: nn.Module, example: torch.Tensor) -> dict:
    """Per-image forward GEMM FLOPs of every Linear/Conv2d and fp32 bytes of one image's activations.

    GEMM FLOPs: Linear 2·D·K; Conv2d 2·(C_in/groups·kh·kw)·C_out·H_out·W_out. Activations: the
    input plus every leaf module's output with distinct storage (in-place ReLUs are not counted twice).
    """
    flops = 0
    storages: dict[int, int] = {example.untyped_storage().data_ptr(): example[:1].numel()}
    alive: list[torch.Tensor] = []  # keep outputs alive so no freed address is reused and merged

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal flops
        if isinstance(module, nn.Linear):
            flops += 2 * module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            d = module.weight[0].numel()
            flops += 2 * d * output.shape[1] * output.shape[2] * output.shape[3]
        if isinstance(output, torch.Tensor):
            storages[output.untyped_storage().data_ptr()] = output[:1].numel()
            alive.append(output)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return {"forward_flops_per_image": flops, "activation_bytes_per_image": 4 * sum(storages.values())}


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process so far (ru_maxrss), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What the numbers were measured on (the backend is reported by each worker separately)."""
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(), "loadavg_1_5_15": list(os.getloadavg()),
        "cuda": torch.cuda.is_available(),
    }
