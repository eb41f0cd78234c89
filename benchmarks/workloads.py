"""Models and data the suite measures on: the tutorial LeNet on the bundled MNIST sample, and the
VGG-style net on seeded random 3×64×64 images (throughput does not depend on the pixel values)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from untangle_ext.data import load_mnist_sample
from untangle_ext.models import LeNet, vgg_style_net

NUM_CLASSES = 10


def lenet() -> nn.Module:
    """The tutorial's LeNet with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    return LeNet().eval()


def vgg(width_div: int = 1, size: int = 64) -> nn.Module:
    """``untangle_ext.models.vgg_style_net`` (width_div=1, size=64), else the same layer pattern
    with every width divided by ``width_div`` for ``size``×``size`` inputs (quick/tiny runs only)."""
    torch.manual_seed(0)
    if width_div == 1 and size == 64:
        return vgg_style_net(NUM_CLASSES).eval()
    layers: list[nn.Module] = []
    c = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, int(v) // width_div, 3, padding=1), nn.ReLU()]
            c = int(v) // width_div
    hidden = 1024 // width_div
    layers += [nn.Flatten(), nn.Linear(c * (size // 8) ** 2, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES)]
    return nn.Sequential(*layers).eval()


def model(name: str, cfg: dict) -> nn.Module:
    """Build the workload model ``name`` ('lenet' or 'vgg') for config ``cfg``."""
    return lenet() if name == "lenet" else vgg(cfg["vgg_width_div"], cfg["vgg_size"])


def images(name: str, n: int, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images with labels for workload ``name``: MNIST in a fixed shuffled order (mixed-label
    batches, repeated when ``n`` exceeds the 4,000 train images) or seeded random VGG inputs with
    balanced shuffled labels (every class present once ``n`` >= 10)."""
    gen = torch.Generator().manual_seed(0)
    if name == "lenet":
        x, y = load_mnist_sample("train")
        order = torch.randperm(x.shape[0], generator=gen).repeat(n // x.shape[0] + 1)[:n]
        return x[order], y[order]
    size = cfg["vgg_size"]
    return torch.randn(n, 3, size, size, generator=gen), torch.randperm(n, generator=gen) % NUM_CLASSES


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split into in-memory batches (so no loader cost is timed)."""
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def by_class(x: torch.Tensor, y: torch.Tensor) -> dict[int, torch.Tensor]:
    """Images grouped by label (the tutorial's per-class loaders)."""
    return {int(c): x[y == c] for c in y.unique()}


def store_prefix(cfg: dict, name: str) -> Path:
    """Where the shared signal stores of workload ``name`` live during one suite run."""
    return Path(cfg["stores_dir"]) / name
