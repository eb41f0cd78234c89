"""Attribution maps → heatmaps: channel sum, symmetric scales (single / joint), difference maps,
colour mapping (seismic, 0 = white), overlay on the input image, readable figures and JSON.

Every map shown to a user lies in [-1, 1]: a single map is divided by its own max |value|; the
top-k maps of one image share ONE scale (the max |value| over all k maps), so their colours can be
compared; difference maps ``m_0 - m_i`` (and their negatives) are put on a common scale the same way.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ._io import atomic_write

HM_DIFF_MODES = ("joint", "single")
ArrayLike = Union[torch.Tensor, np.ndarray]
PathLike = Union[str, "os.PathLike[str]"]


def channel_sum(attributions: torch.Tensor) -> torch.Tensor:
    """Sum over the channel axis: (..., C, H, W) → (..., H, W)."""
    return attributions.sum(dim=-3)


def normalise(maps: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Divide by ``scale`` (default: the max |value| of ``maps``) so values lie in [-1, 1]; zeros stay zero."""
    if scale is None:
        scale = maps.abs().max()
    scale = torch.as_tensor(scale, dtype=maps.dtype, device=maps.device)
    return maps / torch.where(scale > 0, scale, torch.ones_like(scale))


def per_map_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map of a stack (k, H, W) on its own scale: divided by its own max |value|."""
    scale = maps.abs().flatten(1).amax(dim=1).view(-1, *([1] * (maps.dim() - 1)))
    return normalise(maps, scale)


def check_hm_diff(mode: str) -> str:
    """Validate an ``hm_diff`` value: 'joint' (one scale for the k maps) or 'single' (one scale per map)."""
    if mode not in HM_DIFF_MODES:
        raise ValueError(f"hm_diff must be one of {HM_DIFF_MODES} ('joint': the top-k maps share one scale; "
                         f"'single': each map has its own scale), not {mode!r}")
    return mode


def scale_maps(maps: torch.Tensor, mode: str = "joint") -> torch.Tensor:
    """Put a stack of maps (k, H, W) on one common scale (``'joint'``) or one scale per map (``'single'``)."""
    return normalise(maps) if check_hm_diff(mode) == "joint" else per_map_normalise(maps)


def difference_maps(maps: torch.Tensor, mode: str = "joint") -> tuple[torch.Tensor, torch.Tensor]:
    """``diff_i = maps_0 - maps_i`` and ``invDiff_i = maps_i - maps_0`` for i ≥ 1, rescaled by ``mode``.

    ``maps`` are the already scaled class maps (k, H, W), top class first; the results have k-1 maps
    each, and ``diff + invDiff == 0`` exactly (a pair always shares its scale).
    """
    if maps.shape[0] < 2:
        raise ValueError(f"difference maps need at least 2 class maps (topk >= 2), got {maps.shape[0]}")
    diff = scale_maps(maps[:1] - maps[1:], mode)
    return diff, -diff


def colormap(cmap: Any = "seismic"):
    """A matplotlib colormap resampled to an odd number of colours, so that 0 maps exactly to its centre."""
    import matplotlib

    if isinstance(cmap, matplotlib.colors.Colormap):
        return cmap.resampled(257)
    if not isinstance(cmap, str) or cmap not in matplotlib.colormaps:
        raise ValueError(f"unknown colormap {cmap!r}; use a matplotlib colormap name such as 'seismic', "
                         "'bwr' or 'coolwarm' (a diverging one, so that 0 is neutral)")
    return matplotlib.colormaps[cmap].resampled(257)


def _numpy(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def to_rgb(maps: ArrayLike, cmap: Any = "seismic") -> np.ndarray:
    """Colour maps with values in [-1, 1]: (..., H, W) → (..., H, W, 3) float32 in [0, 1] (0 = the centre colour)."""
    values = np.clip(_numpy(maps).astype(np.float64), -1.0, 1.0)
    return colormap(cmap)((values + 1.0) / 2.0)[..., :3].astype(np.float32)


def heatmap_rgb(signal_nhwc: ArrayLike, cmap: Any = "seismic") -> np.ndarray:
    """Attributions (N, H, W, C) → RGB heatmaps (N, H, W, 3) in [0, 1]: channel sum, each image on its own scale."""
    a = torch.as_tensor(_numpy(signal_nhwc), dtype=torch.float64)
    if a.dim() != 4:
        raise ValueError(f"expected attributions shaped (N, H, W, C), got shape {tuple(a.shape)}")
    return to_rgb(per_map_normalise(a.sum(dim=-1)), cmap)


def image_to_rgb(image: Any) -> np.ndarray:
    """An input image (tensor / ndarray / PIL; H×W×C, H×W, or C×H×W with C in 1, 3) → (H, W, 3) float in [0, 1].

    uint8 images are divided by 255; other images (e.g. mean/std-normalised tensors) are min-max
    scaled, so the picture is visible whatever the preprocessing was.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = _numpy(image)
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)  # C×H×W → H×W×C
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"the input image must be H×W×C with C in (1, 3, 4) (or H×W), got shape {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    else:
        a = a.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.clip(a, 0.0, 1.0)
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def overlay(heat_rgb: np.ndarray, image: Any, alpha: float = 0.7) -> np.ndarray:
    """Blend an RGB heatmap (H, W, 3) over the input image: ``alpha * heat + (1 - alpha) * image``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    background = image_to_rgb(image)
    if background.shape[:2] != heat_rgb.shape[:2]:
        raise ValueError(f"the input image is {background.shape[0]}×{background.shape[1]} but the heatmap is "
                         f"{heat_rgb.shape[0]}×{heat_rgb.shape[1]}; pass the image as the model sees it "
                         "(after resizing / cropping), H×W×C")
    return (alpha * heat_rgb + (1.0 - alpha) * background).astype(np.float32)


def save_figure(path: PathLike, panels: Sequence[np.ndarray], titles: Optional[Sequence[str]] = None,
                cmap: Any = "seismic", cols: Optional[int] = None, min_pixels: int = 320, dpi: int = 100,
                label: str = "relative attribution") -> Path:
    """Write RGB panels (H, W, 3) side by side with one colour bar for [-1, 1]; atomically.

    Small images are upscaled (nearest neighbour) so that each panel is at least ``min_pixels`` on its
    longer side; the format follows the suffix (``.JPEG`` → JPEG, quality 95).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("save_figure needs at least one panel")
    titles = list(titles) if titles is not None else [""] * len(panels)
    cols = cols or grid_size(len(panels))[1]
    rows = math.ceil(len(panels) / cols)
    h, w = panels[0].shape[:2]
    zoom = max(1.0, min_pixels / max(h, w))
    title_in = 0.3 if any(titles) else 0.05
    fig = Figure(figsize=(cols * w * zoom / dpi + 1.3, rows * (h * zoom / dpi + title_in) + 0.2), dpi=dpi,
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, rgb, title in zip(axes, panels, titles):
        ax.imshow(np.clip(rgb, 0.0, 1.0), interpolation="nearest")
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    bar = fig.colorbar(ScalarMappable(Normalize(-1.0, 1.0), colormap(cmap)), ax=list(axes), ticks=[-1, 0, 1],
                       fraction=0.05, shrink=0.8)
    bar.set_label(label, fontsize=8)
    return write_figure(fig, path)


def write_figure(fig: Any, path: PathLike, **savefig_kw: Any) -> Path:
    """Save a matplotlib figure atomically in the format its suffix names (JPEG at quality 95)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    extra = {"pil_kwargs": {"quality": 95}} if fmt in ("jpg", "jpeg") else {}
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, **extra, **savefig_kw))


def save_json(path: PathLike, payload: dict) -> Path:
    """Write ``payload`` as UTF-8 JSON, atomically."""
    text = json.dumps(payload, indent=1, allow_nan=False)
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def maps_to_lists(maps: ArrayLike, decimals: int = 6) -> list:
    """Maps as nested lists of floats rounded to ``decimals`` (for JSON)."""
    return np.round(_numpy(maps).astype(np.float64), decimals).tolist()


def grid_size(n: int) -> tuple[int, int]:
    """Rows and columns of a near-square grid holding ``n`` panels."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def explanation_maps(attributions: torch.Tensor, mode: str = "joint") -> dict[str, torch.Tensor]:
    """Attributions of one image for its top-k classes (k, C, H, W) → the maps shown to users.

    ``"class"``: channel sums (k, H, W) on the ``mode`` scale; for k ≥ 2 also ``"diff"`` and
    ``"invDiff"`` (k-1, H, W): top class minus class i and its negative, on a common scale.
    """
    if attributions.dim() != 4:
        raise ValueError(f"expected attributions (k, C, H, W) of one image, got shape {tuple(attributions.shape)}")
    maps = {"class": scale_maps(channel_sum(attributions.double()), mode)}
    if maps["class"].shape[0] > 1:
        maps["diff"], maps["invDiff"] = difference_maps(maps["class"], mode)
    return maps
