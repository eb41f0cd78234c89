"""Build the report: one pass over a labelled loader, then explanations of the chosen images, then HTML + JSON.

Pass 1 (``scan``) runs one PatternAttribution pass per batch, attributed to each image's TRUE class: it
yields the probabilities (for accuracy, calibration and the ranking) and the per-class mean map, and it
keeps only the images that can still be chosen (at most 2·n plus one batch), so memory does not grow
with the test set. Pass 2 explains the chosen images for their top-k classes and runs deletion curves
for PatternAttribution and the gradient.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..attribution import Attributor, Explanation
from ..heatmaps import channel_sum, explanation_maps, normalise, per_map_normalise, save_json
from ..quality.degradation import Curve, area_under_curve, degradation_curve, patch_scores
from ..store import SignalStore
from ..validation import check_topk
from . import analysis, render

PathLike = Union[str, "os.PathLike[str]"]
Stores = Union[SignalStore, Mapping[int, SignalStore]]
CURVE_METHODS = ("pattern_attribution", "gradient")


@dataclass
class Scan:
    """What pass 1 keeps: every image's probabilities and label, the images still eligible, per-class map sums."""

    probs: torch.Tensor  # (N, K) float64
    labels: torch.Tensor  # (N,)
    kept_index: torch.Tensor  # (M,) positions in the loader's order, increasing
    kept_images: torch.Tensor  # (M, C, H, W)
    map_sum: torch.Tensor  # (K, H, W): sum of per-image normalised maps of the true class
    map_count: torch.Tensor  # (K,)


def _batches(loader: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of a loader; anything else is a clear error."""
    for i, batch in enumerate(loader):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"the report needs a labelled loader yielding (images, labels) batches; batch {i} is "
                            f"a {type(batch).__name__}. Wrap your data in a DataLoader(TensorDataset(x, y))")
        x, y = batch[0], torch.as_tensor(batch[1]).reshape(-1).long()
        if not isinstance(x, torch.Tensor) or x.shape[0] != y.shape[0]:
            raise ValueError(f"batch {i}: images and labels must be tensors of equal length; got "
                             f"{tuple(getattr(x, 'shape', ()))} images and {y.shape[0]} labels")
        yield x, y


def _length(loader: Iterable) -> Optional[int]:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_labels(y: torch.Tensor, k: int) -> None:
    if y.numel() and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must be class ids in [0, {k}) (the model has {k} outputs); the loader gave "
                         f"{sorted(set(y.tolist()) - set(range(k)))}")


class _Candidates:
    """The images that may still be chosen, in loader order, with their positions, probabilities and labels."""

    def __init__(self, n: int, by: str):
        self.n, self.by = n, by
        self.parts: Optional[tuple[torch.Tensor, ...]] = None  # (index, images, probs, labels)

    def add(self, start: int, x: torch.Tensor, p: torch.Tensor, y: torch.Tensor) -> None:
        """Merge a batch and keep the union of the n most uncertain and n most confident wrong so far.

        Exact: an image in the global top n of either list is in the top n of every prefix holding it.
        """
        new = (torch.arange(start, start + y.shape[0]), x.detach().cpu(), p, y)
        if self.parts is not None:
            new = tuple(torch.cat([old, add]) for old, add in zip(self.parts, new))
        keep = torch.cat(analysis.select(new[2], new[3], self.n, self.by)).unique()  # sorted: stays in order
        self.parts = tuple(t[keep] for t in new)


@torch.no_grad()
def scan(attributor: Attributor, loader: Iterable, n: int, by: str, progress: bool = True) -> Scan:
    """Pass 1: probabilities, labels, per-class mean-map sums; keeps only the images that may be chosen."""
    k = attributor.num_classes
    probs, labels = [], []
    candidates = _Candidates(n, by)
    map_sum: Optional[torch.Tensor] = None
    map_count = torch.zeros(k, dtype=torch.long)
    seen = 0
    for x, y in tqdm(_batches(loader), total=_length(loader), desc="report: scan", unit="batch", disable=not progress,
                     leave=False):
        _check_labels(y, k)
        exp = attributor.explain(x, target=y)
        probs.append(torch.softmax(exp.logits.double(), 1).cpu())
        labels.append(y)
        maps = per_map_normalise(channel_sum(exp.attributions[:, 0].double())).cpu()
        map_sum = torch.zeros((k, *maps.shape[1:]), dtype=torch.float64) if map_sum is None else map_sum
        map_sum.index_add_(0, y, maps)
        map_count += torch.bincount(y, minlength=k)
        candidates.add(seen, x, probs[-1], y)
        seen += y.shape[0]
    if map_sum is None or candidates.parts is None:
        raise ValueError("the loader yielded no images; pass a loader over the labelled test set")
    return Scan(torch.cat(probs), torch.cat(labels), candidates.parts[0], candidates.parts[1], map_sum, map_count)


def _explain(attributor: Attributor, x: torch.Tensor, batch_size: int, **kw) -> Explanation:
    """:meth:`Attributor.explain` in chunks of ``batch_size`` images, results on the CPU."""
    parts = [attributor.explain(x[i:i + batch_size], **kw) for i in range(0, x.shape[0], batch_size)]
    return Explanation(*(torch.cat([getattr(p, f).cpu() for p in parts]) for f in ("attributions", "targets",
                                                                                    "logits")))


def deletion_curves(attributor: Attributor, x: torch.Tensor, pa: torch.Tensor, predicted: torch.Tensor,
                    points: int, fill: Union[float, Sequence[float]], batch_size: int) -> dict[str, Curve]:
    """Deletion (pixels → ``fill``, most attributed first) for PatternAttribution maps ``pa`` and the gradient,
    at ``points`` steps evenly spaced on a √ axis (the axis the report draws them on)."""
    fill_t = torch.as_tensor(fill, dtype=torch.float64)
    if fill_t.numel() not in (1, x.shape[1]):
        raise ValueError(f"fill must be one value or one per channel ({x.shape[1]}), got {fill_t.numel()} values")
    grad = _explain(attributor, x, batch_size, target=predicted, method="gradient").attributions[:, 0]
    return {name: degradation_curve(attributor.program, x, patch_scores(maps.double(), 1), 1, fill_t, points=points,
                                    batch_size=batch_size, spacing="quadratic")
            for name, maps in zip(CURVE_METHODS, (pa, grad))}


@dataclass
class Report:
    """A written report: the HTML page, the JSON beside it and the numbers it holds (``data["seconds"]``: stages)."""

    html: Path
    json: Path
    data: dict


class _Stages:
    """A progress bar over named stages that also records each stage's wall time."""

    def __init__(self, names: Sequence[str], progress: bool):
        self.bar = tqdm(total=len(names), desc="report", unit="stage", disable=not progress)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        self.bar.update(1)


def _check_settings(out: Path, n: int, topk: int, points: int, bins: int, class_names: Optional[Sequence[str]],
                    num_classes: int) -> None:
    """Fail before any work on a setting that cannot give a report."""
    for name, value, least in (("n", n, 1), ("topk", topk, 2), ("points", points, 2), ("bins", bins, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, not {value!r}"
                             + ("; the report compares the top class with its runner-ups" if name == "topk" else ""))
    check_topk(topk, num_classes)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"the report is an HTML file: give a path ending in .html, not {str(out)!r}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names but the model has {num_classes} classes; "
                         "give one name per class")


def _card(i: int, pos: int, scan_: Scan, exp: Explanation, curves: dict[str, Curve]) -> dict:
    """Every number of one image's card (``pos`` = its row in the explained batch)."""
    p = scan_.probs[i]
    label, targets = int(scan_.labels[i]), exp.targets[pos].tolist()
    return {
        "index": i,
        "label": label,
        "predicted": targets[0],
        "correct": targets[0] == label,
        "topk": [{"class": c, "probability": float(p[c])} for c in targets],
        "probability_of_label": float(p[label]),
        "margin": float(analysis.margin(p[None])[0]),
        "entropy": float(analysis.entropy(p[None])[0]),
        "joint_scale": float(channel_sum(exp.attributions[pos].double()).abs().max()),
        "deletion": {m: _curve_numbers(c.fractions, c.probabilities[:, pos]) for m, c in curves.items()},
    }


def _test_set_numbers(s: Scan, uncertain: torch.Tensor, bins: int) -> dict:
    """The summary's numbers: accuracy, calibration, confusion pairs of the uncertain set, per-class counts."""
    correct = s.probs.argmax(1) == s.labels
    return {
        "images": int(s.labels.numel()),
        "accuracy": float(correct.double().mean()),
        "errors": int((~correct).sum()),
        "calibration": analysis.reliability(s.probs.max(1).values, correct, bins),
        "confusion_pairs_uncertain": analysis.confusion_pairs(s.probs[uncertain], s.labels[uncertain]),
        "class_maps": {"count": s.map_count.tolist(),
                       "accuracy": [float(correct[s.labels == c].double().mean()) if s.map_count[c] else None
                                    for c in range(s.probs.shape[1])]},
    }


def _curve_numbers(fractions: torch.Tensor, probability: torch.Tensor) -> dict:
    """A deletion curve for the JSON: p(predicted class) at each step and the area under it."""
    return {"auc": area_under_curve(fractions, probability), "probability": probability.tolist()}


def build(
    model: torch.nn.Module,
    stores: Stores,
    loader: Iterable,
    out: PathLike = "results/report.html",
    n: int = 50,
    by: str = "margin",
    topk: int = 3,
    points: int = 21,
    fill: Union[float, Sequence[float]] = 0.0,
    bins: int = 10,
    class_names: Optional[Sequence[str]] = None,
    cmap: str = "seismic",
    batch_size: int = 256,
    title: str = "Why is the model unsure?",
    progress: bool = True,
) -> Report:
    """Write the explanation report of the ``n`` most uncertain and ``n`` most confident wrong predictions.

    ``loader`` yields labelled (images, labels) test batches; images are numbered in its order. ``by`` is
    'margin' or 'entropy'; deletion curves set pixels to ``fill`` (0 = black on MNIST; pass the per-channel
    mean for normalised inputs) at ``points`` steps, evenly spaced on a √ axis. Writes ``out`` (self-contained HTML) and ``out`` with
    suffix ``.json`` (every number shown), atomically. The model is never modified.
    """
    analysis.check_uncertainty(by)
    out = Path(out)
    attributor = Attributor(model, stores)
    _check_settings(out, n, topk, points, bins, class_names, attributor.num_classes)
    start = time.perf_counter()
    stages = _Stages(("scan", "explain", "deletion", "figures", "html"), progress)
    with stages("scan"):
        s = scan(attributor, loader, n, by, progress)
    with stages("explain"):
        uncertain, wrong = (s.kept_index[i] for i in analysis.select(s.probs[s.kept_index], s.labels[s.kept_index],
                                                                     n, by))
        chosen = torch.cat([uncertain, wrong]).unique()
        row_of = {int(i): r for r, i in enumerate(chosen.tolist())}
        x = s.kept_images[torch.searchsorted(s.kept_index, chosen)]
        exp = _explain(attributor, x, batch_size, target=s.probs[chosen].topk(topk, dim=1).indices)
    with stages("deletion"):
        curves = deletion_curves(attributor, x, exp.attributions[:, 0], exp.targets[:, 0], points, fill, batch_size)
    sections = {"uncertain": uncertain.tolist(), "confident_wrong": wrong.tolist()}
    cards = {i: _card(i, row_of[i], s, exp, curves) for i in chosen.tolist()}
    data = {
        "title": title,
        "settings": {"n": n, "uncertainty": by, "topk": topk, "deletion_points": points,
                     "deletion_fill": torch.as_tensor(fill).tolist(), "calibration_bins": bins, "cmap": cmap},
        "class_names": list(class_names) if class_names is not None else None,
        **_test_set_numbers(s, uncertain, bins),
        "deletion_fractions": curves["gradient"].fractions.tolist(),
        "deletion_mean": {sec: {m: _curve_numbers(c.fractions, c.probabilities[:, [row_of[i] for i in idx]].mean(1))
                                for m, c in curves.items()} for sec, idx in sections.items() if idx},
        "sections": {sec: [cards[i] for i in idx] for sec, idx in sections.items()},
    }
    with stages("figures"):
        tiles = {i: render.image_tiles(x[r], explanation_maps(exp.attributions[r]), cmap) for i, r in row_of.items()}
        class_maps = normalise(s.map_sum / s.map_count.clamp(min=1).view(-1, 1, 1))
        figures = render.summary_figures(data, class_maps, cmap)
    with stages("html"):
        html = render.page(data, tiles, figures)
    stages.bar.close()
    data["seconds"] = {**stages.seconds, "total_before_writing": time.perf_counter() - start}
    report = Report(out, out.with_suffix(".json"), data)
    save_json(report.json, data)
    render.write_html(report.html, html)
    return report


def mnist_inputs(model: Optional[torch.nn.Module] = None, store_prefix: Optional[PathLike] = None,
                 cache: PathLike = ".cache/lenet_mnist.pt", batch_size: int = 250,
                 progress: bool = True) -> tuple[torch.nn.Module, Stores, Iterable]:
    """The CLI's defaults: (``model`` or the demo's LeNet, stores from ``store_prefix`` or estimated on the bundled
    train split, a loader over the bundled test split)."""
    from ..data import mnist_sample_loader
    from ..estimator import SignalEstimator
    from ..models import load_or_train_lenet
    from ..store import load_class_stores
    from ..trace import Program

    if model is None:
        model = load_or_train_lenet(cache, progress=progress)[0]
    if store_prefix is not None:
        stores: Stores = load_class_stores(store_prefix, range(Program(model).num_outputs))
    else:
        stores = SignalEstimator(model, progress=progress).fit(mnist_sample_loader(batch_size, split="train"))
    return model, stores, mnist_sample_loader(batch_size, split="test")
