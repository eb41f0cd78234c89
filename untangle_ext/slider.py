"""Importance threshold: keep only the pixels whose |attribution| lies in the top fraction.

``slider`` shows it interactively with ipywidgets when installed (threshold ``th`` in [0, 0.99] removes
that fraction of the least important pixels), otherwise it writes a static figure sweeping thresholds.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from . import heatmaps

ArrayLike = Union[torch.Tensor, np.ndarray]
SWEEP = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)


def keep_top_fraction(attribution: ArrayLike, fraction: float) -> ArrayLike:
    """Zero every pixel of each map (..., H, W) except the ``fraction`` with the largest |value|.

    ``fraction=1`` keeps all, ``0`` none; pixels tied with the smallest kept |value| are kept too.
    Returns the same type (tensor / ndarray) as ``attribution``.
    """
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    t = torch.as_tensor(attribution)
    if t.dim() < 2:
        raise ValueError(f"expected maps shaped (..., H, W), got shape {tuple(t.shape)}")
    flat = t.abs().flatten(-2)
    keep = min(flat.shape[-1], math.ceil(float(fraction) * flat.shape[-1]))
    if keep == 0:
        out = torch.zeros_like(t)
    else:
        threshold = flat.topk(keep, dim=-1).values[..., -1:].unsqueeze(-1)
        out = torch.where(t.abs() >= threshold, t, torch.zeros_like(t))
    return out.numpy() if isinstance(attribution, np.ndarray) else out


def importance_map(attribution: ArrayLike) -> torch.Tensor:
    """One 2-D map in [-1, 1]: (H, W) as is, (C, H, W) or (1, C, H, W) summed over channels; own scale."""
    t = torch.as_tensor(attribution, dtype=torch.float64)
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 3:
        t = heatmaps.channel_sum(t)
    if t.dim() != 2:
        raise ValueError(f"expected one attribution (H, W), (C, H, W) or (1, C, H, W), got {tuple(t.shape)}")
    return heatmaps.normalise(t)


def _panel(m: torch.Tensor, th: float, image: Any, cmap: Any) -> np.ndarray:
    rgb = heatmaps.to_rgb(keep_top_fraction(m, 1.0 - th), cmap)
    return rgb if image is None else heatmaps.overlay(rgb, image)


def threshold_sweep(attribution: ArrayLike, path: Union[str, Path], image: Any = None,
                    thresholds: Sequence[float] = SWEEP, cmap: Any = "seismic") -> Path:
    """A static figure: one panel per threshold ``th`` (the least important fraction removed)."""
    m = importance_map(attribution)
    for th in thresholds:
        if not 0.0 <= th < 1.0:
            raise ValueError(f"thresholds must lie in [0, 1), got {th}")
    panels = [_panel(m, th, image, cmap) for th in thresholds]
    titles = [f"th={th:.2f}: top {100 * (1 - th):.0f}%" for th in thresholds]
    return heatmaps.save_figure(path, panels, titles, cmap, cols=len(panels), min_pixels=160)


def slider(attribution: ArrayLike, image: Any = None, path: Union[str, Path] = "threshold_sweep.png",
           cmap: Any = "seismic"):
    """An ipywidgets slider over the threshold when ipywidgets is installed, else a threshold sweep → ``path``."""
    try:
        from ipywidgets import interact
    except ImportError:
        return threshold_sweep(attribution, path, image, cmap=cmap)
    import matplotlib.pyplot as plt

    m = importance_map(attribution)

    def show(th: float) -> None:
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(_panel(m, th, image, cmap), interpolation="nearest")
        ax.set_title(f"top {100 * (1 - th):.0f}% of pixels by |attribution|")
        ax.set_axis_off()
        plt.show()

    return interact(show, th=(0.0, 0.99, 0.01))
