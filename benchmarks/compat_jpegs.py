"""Time the tutorial's seven JPEGs of an ``attribute_signals`` top-3 call (issue 12).

Two numbers: writing the 7 files with the LUT + PIL panel (``heatmaps.save_panel``, what the compat API
uses) versus the matplotlib figure it replaced (``heatmaps.save_figure``), on the same maps; and the
whole ``attribute_signals`` call (LeNet, random weights, stores from 2,000 sample images)::

    OMP_NUM_THREADS=1 python -m benchmarks.compat_jpegs
"""
from __future__ import annotations

import tempfile
import types
from typing import Callable

import torch

from untangle_ext import SignalEstimator, UntangleAI, heatmaps
from untangle_ext.data import load_mnist_sample, mnist_sample_loader
from untangle_ext.models import LeNet

from .measure import time_repeats

TITLE, LABEL = "top-1: 7 [7]  p=0.990", "attribution (joint scale)"


def _median(fn: Callable[[], object], repeats: int = 5) -> tuple[float, float]:
    """(median, min) seconds of ``fn`` after one warm-up call."""
    result = time_repeats(fn, 1, repeats)
    return result["median_s"], result["min_s"]


def write_seven(folder: str, writer: Callable) -> None:
    """The 7 panels of a top-3 explanation (3 class maps, 2 diff, 2 invDiff) through ``writer(path, rgb)``."""
    g = torch.Generator().manual_seed(0)
    maps = heatmaps.explanation_maps(torch.randn(3, 1, 28, 28, generator=g), "joint")
    image = torch.rand(28, 28, 1, generator=g)
    for kind, stack in maps.items():
        for j, m in enumerate(stack):
            writer(f"{folder}/{kind}_{j}.JPEG", heatmaps.overlay(heatmaps.to_rgb(m), image))


def main() -> None:
    folder = tempfile.mkdtemp()
    pil = _median(lambda: write_seven(folder, lambda p, rgb: heatmaps.save_panel(p, rgb, TITLE, label=LABEL)))
    mpl = _median(lambda: write_seven(folder, lambda p, rgb: heatmaps.save_figure(p, [rgb], [TITLE], label=LABEL)))
    torch.manual_seed(0)
    model = LeNet().eval()
    prefix = f"{folder}/lenet_signals"
    stores = SignalEstimator(model, progress=False).fit(mnist_sample_loader(256, classes=list(range(10))))
    for c, store in stores.items():
        store.save(f"{prefix}_class_{c}.pkl")
    x = load_mnist_sample("test")[0][742:743]
    args = types.SimpleNamespace(topk=3, img_size=(1, 28, 28), num_classes=10)
    call = _median(lambda: UntangleAI().attribute_signals(model, x, None, prefix, None, args, f"{folder}/digit"))
    print(f"7 JPEGs, LUT + PIL:         median {pil[0]:.3f} s, min {pil[1]:.3f} s")
    print(f"7 JPEGs, matplotlib figure: median {mpl[0]:.3f} s, min {mpl[1]:.3f} s")
    print(f"attribute_signals top-3:    median {call[0]:.3f} s, min {call[1]:.3f} s (torch threads: "
          f"{torch.get_num_threads()})")


if __name__ == "__main__":
    main()
