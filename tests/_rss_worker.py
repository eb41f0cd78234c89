"""Subprocess of the memory test: estimate a 1,000-class network over a labelled data set; print peak RSS facts.

argv: classes, samples per class. Prints one JSON line: RSS before and peak RSS during the estimation
(bytes), one class's accumulator bytes, one batch's bytes, the number of stores produced and of samples read.

Run it with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0: glibc then maps every block over 64 KiB
on its own and unmaps it when freed, so RSS follows the live memory. With glibc's defaults freed blocks stay
in the heap: the warm-up's working set is already in the RSS before, and the measured growth was anything
from 0.1 to 2 MB for the same code (allocator history, not the estimator).
"""
import json
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from untangle_ext import SignalEstimator
from untangle_ext.moments import accumulator_bytes

classes, per_class = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, classes)).eval()
labels = torch.arange(classes).repeat_interleave(per_class)
x = torch.randn(labels.numel(), 512) + labels.view(-1, 1) % 7


class Counting(TensorDataset):
    """Counts sample reads, to prove every sample is read once."""

    reads = 0

    def __getitem__(self, i):
        Counting.reads += 1
        return super().__getitem__(i)


loader = DataLoader(Counting(x, labels), batch_size=64)
est = SignalEstimator(model, progress=False, store_dtype=torch.float16)
est.fingerprint  # noqa: B018 (computed before the baseline)
done = 0
for warm in est.iter_fit(loader, classes=[0, 1]):  # warm-up: torch's and the backend's one-time allocations
    del warm


def status(field: str) -> int:
    """A /proc/self/status value in bytes. VmHWM, not ru_maxrss: a forked child's ru_maxrss keeps the parent's
    peak across exec (so under pytest it reported the test runner's size), VmHWM belongs to this process alone."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))


def reset_peak() -> None:
    """Start VmHWM afresh at the current RSS (Linux >= 4.0), so the peak is that of the estimation below."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


Counting.reads = 0
before = status("VmRSS")
reset_peak()
store_bytes = 0
for c, store in est.iter_fit(loader):
    done += 1
    store_bytes = max(store_bytes, sum(t.numel() * t.element_size() for p in store.patterns.values()
                                       for t in p.values()))
    del store
peak = status("VmHWM")
print(json.dumps({"before": before, "peak": peak, "accumulators": accumulator_bytes(est.program),
                  "batch": min(per_class, 64) * 512 * 4, "store": store_bytes, "stores": done,
                  "reads": Counting.reads, "samples": labels.numel()}))
