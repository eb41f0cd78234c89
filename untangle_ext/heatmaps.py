"""Attribution maps → heatmaps: channel sum, symmetric scales (single / joint), difference maps,
colour mapping (seismic, 0 = white), overlay on the input image, readable figures and JSON.

Every map shown to a user lies in [-1, 1]: a single map is divided by its own max |value|; the
top-k maps of one image share ONE scale (the max |value| over all k maps), so their colours can be
compared; difference maps ``m_0 - m_i`` (and their negatives) are put on a common scale the same way.
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ._io import atomic_write

HM_DIFF_MODES = ("joint", "single")
LUT_SIZE = 257  # odd, so that 0 has a colour of its own (the centre of a diverging map)
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
        return cmap.resampled(LUT_SIZE)
    if not isinstance(cmap, str) or cmap not in matplotlib.colormaps:
        raise ValueError(f"unknown colormap {cmap!r}; use a matplotlib colormap name such as 'seismic', "
                         "'bwr' or 'coolwarm' (a diverging one, so that 0 is neutral)")
    return matplotlib.colormaps[cmap].resampled(LUT_SIZE)


def _numpy(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def colour_table(cmap: Any = "seismic") -> np.ndarray:
    """The colormap's 257 RGB colours (257, 3) float32, entry 128 = the colour of 0."""
    return _named_table(cmap) if isinstance(cmap, str) else _table(colormap(cmap))


@functools.lru_cache(maxsize=16)
def _named_table(name: str) -> np.ndarray:
    table = _table(colormap(name))
    table.setflags(write=False)
    return table


def _table(cm: Any) -> np.ndarray:
    return cm(np.arange(LUT_SIZE))[:, :3].astype(np.float32)


def lut_index(maps: ArrayLike) -> np.ndarray:
    """Values in [-1, 1] → indices into :func:`colour_table` (the colormap's own binning: 0 → the centre)."""
    values = np.clip(_numpy(maps).astype(np.float64), -1.0, 1.0)
    return np.minimum(((values + 1.0) / 2.0 * LUT_SIZE).astype(np.int64), LUT_SIZE - 1)


def to_rgb(maps: ArrayLike, cmap: Any = "seismic") -> np.ndarray:
    """Colour maps with values in [-1, 1]: (..., H, W) → (..., H, W, 3) float32 in [0, 1] (0 = the centre colour)."""
    return colour_table(cmap)[lut_index(maps)]


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


def ink(image: Any) -> np.ndarray:
    """How much an input pixel differs from the image's blank background: (H, W) in [0, 1].

    The luminance, inverted when the image is mostly light (the median pixel above 0.5), so that
    the background is 0 both for white-on-black digits and for dark-on-light pictures.
    """
    lum = image_to_rgb(image).mean(axis=-1)
    return 1.0 - lum if float(np.median(lum)) > 0.5 else lum


def overlay(heat_rgb: np.ndarray, image: Any, alpha: float = 0.7) -> np.ndarray:
    """Draw the input image as grey ink under an RGB heatmap (H, W, 3): ``heat * (1 - (1 - alpha) * ink)``.

    Where the image is blank the pixel is exactly the heatmap's colour (0 = white, as the colour bar
    says); the image's strokes darken it by up to ``1 - alpha``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    shade = ink(image)
    if shade.shape != heat_rgb.shape[:2]:
        raise ValueError(f"the input image is {shade.shape[0]}×{shade.shape[1]} but the heatmap is "
                         f"{heat_rgb.shape[0]}×{heat_rgb.shape[1]}; pass the image as the model sees it "
                         "(after resizing / cropping), H×W×C")
    return (heat_rgb * (1.0 - (1.0 - alpha) * shade)[..., None]).astype(np.float32)


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


def save_panel(path: PathLike, rgb: np.ndarray, title: str = "", cmap: Any = "seismic", min_pixels: int = 320,
               label: str = "relative attribution") -> Path:
    """One RGB panel (H, W, 3) with a title and a colour bar for [-1, 1], drawn with PIL (no matplotlib); atomic.

    The look of :func:`save_figure` with one panel at about a tenth of the time: the panel is upscaled by
    an integer factor (nearest neighbour) to at least ``min_pixels``; JPEG at quality 95 for ``.JPEG``.
    """
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    zoom = max(1, math.ceil(min_pixels / max(h, w)))
    panel = Image.fromarray(_to_uint8(rgb)).resize((w * zoom, h * zoom), Image.NEAREST)
    font = _font(14)
    top, gap, bar_w = 30, 14, 16
    bar_h = int(panel.height * 0.8)
    canvas = Image.new("RGB", (panel.width + 2 * gap + bar_w + 52, panel.height + top + gap), "white")
    canvas.paste(panel, (gap, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap + panel.width / 2, top / 2), title, fill="black", font=font, anchor="mm")
    draw.rectangle((gap - 1, top - 1, gap + panel.width, top + panel.height), outline="black")
    x0, y0 = gap * 2 + panel.width, top + (panel.height - bar_h) // 2
    ramp = _to_uint8(colour_table(cmap)[lut_index(np.linspace(1.0, -1.0, bar_h))])
    canvas.paste(Image.fromarray(np.repeat(ramp[:, None], bar_w, axis=1)), (x0, y0))
    draw.rectangle((x0 - 1, y0 - 1, x0 + bar_w, y0 + bar_h), outline="black")
    for value, y in ((1, y0), (0, y0 + bar_h // 2), (-1, y0 + bar_h - 1)):
        draw.line((x0 + bar_w, y, x0 + bar_w + 4, y), fill="black")
        draw.text((x0 + bar_w + 7, y), f"{value:g}", fill="black", font=_font(12), anchor="lm")
    _vertical_text(canvas, label, (x0 + bar_w + 40, y0 + bar_h // 2), _font(11))
    fmt = "JPEG" if Path(path).suffix.lower() in (".jpg", ".jpeg") else (Path(path).suffix.lstrip(".").upper() or "PNG")
    extra = {"quality": 95} if fmt == "JPEG" else {}
    return atomic_write(path, lambda f: canvas.save(f, format=fmt, **extra))


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _font(size: int):
    """PIL's bundled scalable font (DejaVu Sans shipped with Pillow), so no system font is needed."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _vertical_text(canvas: Any, text: str, centre: tuple[int, int], font: Any) -> None:
    """Draw ``text`` rotated by 90° (reading upwards) centred on ``centre``."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    strip = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(strip).text((1 - left, 1 - top), text, fill=255, font=font)
    strip = strip.rotate(90, expand=True)
    at = (centre[0] - strip.width // 2, centre[1] - strip.height // 2)
    canvas.paste(Image.new("RGB", strip.size, "black"), at, strip)


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
