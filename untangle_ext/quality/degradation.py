"""Image degradation (paper Fig. 4) and deletion curves, and the area under them.

Split each image into non-overlapping ``patch``×``patch`` squares, rank them by
summed attribution (most positive first; ties keep the lower index first), and
replace the first n of them with a fill value; the curve is the mean softmax
probability of the class the model predicted for the unmodified image, at
every n. A steeper fall (smaller area) means the ranking found the evidence
first. ``deletion`` is the same procedure with single pixels set to 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
from tqdm.auto import tqdm

from .._progress import bars_off
from ..attribution import Attributor
from ..store import SignalStore
from ..trace import Program

#: Rankings compared by :func:`rankings_for_methods`: name → (Attributor method, estimator, times input).
RANKINGS = {
    "pattern_attribution": ("pattern_attribution", "positive", False),  # S_a±
    "pattern_attribution_linear": ("pattern_attribution", "linear", False),  # S_a
    "patternnet": ("patternnet", "positive", False),
    "gradient": ("gradient", "positive", False),  # S_w
    "input_x_gradient": ("gradient", "positive", True),  # S_x
}


@dataclass
class Curve:
    """Mean probability of the originally predicted class after replacing a fraction of the image."""

    fractions: torch.Tensor  # (T,) from 0 to 1, nondecreasing
    counts: torch.Tensor  # (T,) patches replaced at each step
    probabilities: torch.Tensor  # (T, B) per image
    predicted: torch.Tensor  # (B,) class predicted for the unmodified image

    @property
    def mean(self) -> torch.Tensor:
        return self.probabilities.mean(1)

    @property
    def auc(self) -> float:
        return area_under_curve(self.fractions, self.mean)


def area_under_curve(fractions: torch.Tensor, values: torch.Tensor) -> float:
    """Trapezoidal area over the fraction axis (a constant curve c on [0, 1] gives exactly c)."""
    if fractions.numel() < 2:
        raise ValueError("a curve needs at least two points to have an area")
    return float(torch.trapezoid(values.double(), fractions.double()))


def patch_scores(attributions: torch.Tensor, patch: int) -> torch.Tensor:
    """Summed attribution (over channels and pixels) of each patch, (B, P) in row-major patch order."""
    b, _, h, w = attributions.shape
    check_patch(h, w, patch)
    s = attributions.sum(1).reshape(b, h // patch, patch, w // patch, patch)
    return s.sum((2, 4)).reshape(b, -1)


def check_patch(h: int, w: int, patch: int) -> None:
    """Raise a clear error unless ``patch`` tiles an ``h``×``w`` image exactly."""
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"patch size {patch} must be >= 1 and divide the image size {h}x{w}; "
                         f"choose a divisor (e.g. 4 or 7 for 28x28)")


def _pixel_ranks(scores: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """Rank (0 = replaced first) of the patch each pixel belongs to, (B, H, W)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    grid = ranks.view(-1, h // patch, w // patch)
    return grid.repeat_interleave(patch, 1).repeat_interleave(patch, 2)


@torch.no_grad()
def degradation_curve(
    model: Union[torch.nn.Module, Program],
    images: torch.Tensor,
    scores: torch.Tensor,
    patch: int,
    fill: Union[float, torch.Tensor],
    points: Optional[int] = None,
    batch_size: int = 500,
    desc: Optional[str] = None,
    spacing: str = "linear",
) -> Curve:
    """Replace patches in the order of ``scores`` (B, P), highest first, with ``fill`` (scalar or per channel).

    ``points`` evaluation steps from 0 to all P patches (default: after every
    patch), evenly spaced (``spacing="linear"``) or evenly on a √ axis
    (``"quadratic"``: fine steps at the start, where curves fall fastest). The
    model runs through its traced :class:`Program`, so it is never called or modified.
    """
    program = model if isinstance(model, Program) else Program(model)
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W); got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    check_patch(h, w, patch)
    num = (h // patch) * (w // patch)
    if scores.shape != (b, num):
        raise ValueError(f"scores must be (images, patches) = ({b}, {num}); got {tuple(scores.shape)}")
    weight = program.layers[0].weight
    x = images.to(weight.device, weight.dtype)
    fill_t = torch.as_tensor(fill).to(x).reshape(1, -1, 1, 1).expand(b, c, h, w)
    ranks = _pixel_ranks(scores.to(x.device), h, w, patch).unsqueeze(1)
    steps = (num + 1) if points is None else points
    if spacing == "linear":
        counts = torch.linspace(0, num, steps)
    elif spacing == "quadratic":
        counts = torch.linspace(0, 1, steps, dtype=torch.float64) ** 2 * num
    else:
        raise ValueError(f"spacing must be 'linear' or 'quadratic' (even steps on a square-root axis), not {spacing!r}")
    counts = counts.round().long().unique()
    predicted = _logits(program, x, batch_size).argmax(1)
    probs = []
    for n in tqdm(counts.tolist(), desc=desc, disable=bars_off(desc is not None), leave=False):
        degraded = torch.where(ranks < n, fill_t, x)
        p = torch.softmax(_logits(program, degraded, batch_size).double(), 1)
        probs.append(p.gather(1, predicted.unsqueeze(1)).squeeze(1).cpu())
    return Curve(counts.double() / num, counts, torch.stack(probs), predicted.cpu())


def _logits(program: Program, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([program.forward(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def attribution_maps(attributor: Attributor, images: torch.Tensor, ranking: str) -> torch.Tensor:
    """Attributions for the predicted class of each image under one of :data:`RANKINGS`."""
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; use one of {tuple(RANKINGS)} or 'random'")
    method, estimator, times_input = RANKINGS[ranking]
    a = attributor.attribute(images, method=method, estimator=estimator)
    return a * images.to(a) if times_input else a


def score_maps(
    model: torch.nn.Module,
    stores: Union[SignalStore, Mapping[int, SignalStore], None],
    images: torch.Tensor,
    rankings: tuple[str, ...] = tuple(RANKINGS) + ("random",),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Maps shaped like ``images`` (float64) per ranking; ``random`` is uniform noise (a random order per image)."""
    attributor = Attributor(model, stores)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in rankings:
        if name == "random":
            out[name] = torch.rand(images.shape, generator=gen, dtype=torch.float64)
        else:
            out[name] = attribution_maps(attributor, images, name).double()
    return out
