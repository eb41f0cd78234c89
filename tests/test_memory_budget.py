"""The default accumulator budget comes from the device the accumulators live on."""
from __future__ import annotations

import torch

from untangle_ext import estimator


def test_cuda_budget_is_the_gpus_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 << 30, 80 << 30))
    assert estimator._available_memory(torch.device("cuda", 0)) == 4 << 30
    # half of the GPU's 4 GiB free = 2 GiB: 1 GiB per class -> 2 classes per chunk, whatever the host RAM
    assert estimator.chunk_classes(list(range(5)), 1 << 30, None, torch.device("cuda", 0)) == [[0, 1], [2, 3], [4]]


def test_cpu_budget_is_host_memory():
    free = estimator._available_memory(torch.device("cpu"))
    with open("/proc/meminfo") as f:
        avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    assert abs(free - avail) < 1 << 30  # MemAvailable moves between the two reads
