"""Subprocess of the memory test: estimate a 1,000-class network over a labelled data set; print peak RSS facts.

argv: classes, samples per class. Prints one JSON line: baseline and peak RSS (bytes), one class's
accumulator bytes, one batch's bytes, the number of stores produced and of samples read.
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
for warm in est.iter_fit(loader, classes=[0, 1]):  # warm-up: two classes set the one-class peak
    del warm


def status(field: str) -> int:
    """A /proc/self/status value in bytes. VmHWM, not ru_maxrss: a forked child's ru_maxrss keeps the parent's
    peak across exec (so under pytest it reported the test runner's size), VmHWM belongs to this process alone."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))


Counting.reads = 0
baseline, current = status("VmHWM"), status("VmRSS")
for c, store in est.iter_fit(loader):
    done += 1
    del store
peak = status("VmHWM")
print(json.dumps({"baseline_peak": baseline, "current_before": current, "peak": peak,
                  "accumulators": accumulator_bytes(est.program),
                  "patterns_f64": 3 * 8 * sum(layer.weight.numel() for layer in est.program.layers), "batch": 64 * 512 * 4,
                  "stores": done, "reads": Counting.reads, "samples": labels.numel()}))
