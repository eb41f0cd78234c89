"""The UntangleAI tutorial's API on top of the native engine: same names, arguments and file names.

Scripts written against the tutorial run with one changed import::

    from untangle_ext import UntangleAI

Every method translates the tutorial's call onto :class:`~untangle_ext.SignalEstimator`,
:class:`~untangle_ext.Attributor` and :class:`~untangle_ext.SignalStore`; the heatmap arithmetic
lives in :mod:`untangle_ext.heatmaps`, the loaders in :mod:`untangle_ext.loaders`. The user's model
is never modified (nothing here calls it: the engine runs a traced copy of its forward).
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import heatmaps, loaders, slider, validation
from .attribution import Attributor
from .estimator import SignalEstimator
from .store import SignalStore, class_store_path, model_fingerprint
from .trace import Program
from .validation import EmptyClassWarning, InputError

MODES = ("estimate", "attribute")
FILE_KIND = {"class": "", "diff": "diff_", "invDiff": "invDiff_"}  # map kind → tutorial file name part


@dataclass(frozen=True)
class CompatArgs:
    """The tutorial's ``args`` fields, validated; None where the tutorial leaves a field to the model/data."""

    mname: str = "model"
    batch_size: int = 16
    num_classes: Optional[int] = None
    img_size: Optional[tuple[int, ...]] = None
    data_class: Any = None  # as the user wrote it (passed back to their loader function)
    classes: Optional[list[int]] = None  # data_class parsed to ints
    mode: str = "estimate"
    topk: int = 1
    cmap: Any = "seismic"
    json: bool = False
    hm_diff: str = "joint"


def resolve_args(args: Any) -> CompatArgs:
    """Read the tutorial's fields from any object (or mapping); defaults for missing ones, clear errors for bad ones."""
    def get(name: str, default: Any) -> Any:
        value = args.get(name, default) if isinstance(args, Mapping) else getattr(args, name, default)
        return default if value is None and default is not None else value

    d = CompatArgs()
    mname = get("mname", d.mname)
    if not isinstance(mname, str) or not mname:
        raise validation.ArgumentError(f"args.mname must be a non-empty string (used in file names), not {mname!r}")
    num_classes = get("num_classes", None)
    num_classes = None if num_classes is None else validation.positive_int(num_classes, "args.num_classes")
    topk = validation.positive_int(get("topk", d.topk), "args.topk")
    if num_classes is not None:
        validation.check_topk(topk, num_classes, "args.topk")
    cmap = get("cmap", d.cmap)
    heatmaps.colormap(cmap)
    data_class = get("data_class", None)
    return CompatArgs(
        mname=mname, batch_size=validation.positive_int(get("batch_size", d.batch_size), "args.batch_size"),
        num_classes=num_classes, img_size=validation.image_size(get("img_size", None), "args.img_size"),
        data_class=data_class, classes=validation.class_ids(data_class, num_classes, "args.data_class"),
        mode=validation.choice(get("mode", d.mode), MODES, "args.mode"), topk=topk, cmap=cmap,
        json=validation.boolean(get("json", d.json), "args.json"),
        hm_diff=heatmaps.check_hm_diff(get("hm_diff", d.hm_diff)),
    )


def check_model(program: Program, a: CompatArgs) -> None:
    """args.num_classes, args.topk and args.data_class must fit the model's number of outputs."""
    n = program.num_outputs
    if a.num_classes is not None and a.num_classes != n:
        raise validation.ArgumentError(f"args.num_classes={a.num_classes} but the model has {n} outputs; fix "
                                       "args.num_classes")
    validation.check_topk(a.topk, n, "args.topk")
    validation.class_ids(a.classes, n, "args.data_class")


def load_stores(signal_store_path: str, classes: Iterable[int], program: Optional[Program] = None,
                fingerprint: Optional[str] = None) -> dict[int, SignalStore]:
    """Load the tutorial's per-class store files; a missing one names the file and how to make it.

    With ``program`` (and the model's ``fingerprint``) each store is checked against that model.
    """
    classes = list(dict.fromkeys(int(c) for c in classes))
    check_store_files(signal_store_path, classes)
    stores = {c: SignalStore.load(class_store_path(signal_store_path, c), expected_class=c) for c in classes}
    if program is not None:
        for store in stores.values():
            store.check_matches(program, fingerprint)
    return stores


def check_store_files(signal_store_path: str, classes: Iterable[int]) -> None:
    """Raise FileNotFoundError naming every missing ``{prefix}_class_{c}.pkl`` of ``classes`` and how to make them
    (a stat per class: nothing is read)."""
    _check_prefix(signal_store_path)
    missing = [str(class_store_path(signal_store_path, c)) for c in classes
               if not class_store_path(signal_store_path, c).is_file()]
    if missing:
        raise FileNotFoundError(f"no signal store for {len(missing)} class(es): {', '.join(missing)}. Run "
                                f"UntangleAI().estimate_signals(model, {str(signal_store_path)!r}, train_loader_fun, "
                                "args) for these classes first")


def _check_prefix(signal_store_path: Any) -> None:
    """A prefix that already names one store file (``..._class_3.pkl``) is the likely mistake: say so."""
    match = re.search(r"^(.*)_class_\d+\.pkl$", os.fspath(signal_store_path))
    if match:
        raise validation.ArgumentError(
            f"signal_store_path={os.fspath(signal_store_path)!r} names one store file; pass the prefix "
            f"{match.group(1)!r} (the files are {{prefix}}_class_{{c}}.pkl)")


def attributor_for(model: nn.Module, a: CompatArgs) -> Attributor:
    """An :class:`Attributor` of ``model`` with no stores yet: the ONE trace of a compat call."""
    attributor = Attributor(model)
    check_model(attributor.program, a)
    return attributor


def add_stores(attributor: Attributor, model: nn.Module, signal_store_path: str, classes: Iterable[int]) -> None:
    """Load the stores of ``classes`` (checked against the attributor's traced model) into ``attributor``."""
    attributor.stores.update(load_stores(signal_store_path, classes, attributor.program, model_fingerprint(model)))


@dataclass
class _CheckedLoader:
    """A user's loader, passed through: None batches skipped, image shapes checked against args.img_size.
    Keeps the loader's length, so the per-class progress bar knows its total."""

    batches: Iterable
    img_size: Optional[tuple[int, ...]]
    label: Any

    def __len__(self) -> int:
        return len(self.batches)  # TypeError for loaders without a length: tqdm then shows counts only

    @property
    def batch_sampler(self) -> Any:
        """The loader's batch sampler, so distributed estimation sees a ShardSampler and does not re-shard."""
        return getattr(self.batches, "batch_sampler", None)

    def __iter__(self):
        for batch in self.batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if x is None:
                continue
            if isinstance(x, torch.Tensor):
                validation.check_shape(x.shape, self.img_size, f"the loader for class {self.label!r}",
                                       "args.img_size")
            yield batch if isinstance(batch, (tuple, list)) else (batch, None)


class Visualization:
    """The tutorial's heatmap helpers (``untangle_ai.visualization()``)."""

    @staticmethod
    def _stack(topk_gradients: Any) -> torch.Tensor:
        """A list of k attributions (1, C, H, W) or a tensor (k, C, H, W) → (k, C, H, W)."""
        if isinstance(topk_gradients, torch.Tensor):
            return topk_gradients.reshape(-1, *topk_gradients.shape[-3:])
        return torch.cat([torch.as_tensor(g).reshape(-1, *g.shape[-3:]) for g in topk_gradients])

    def get_joint_heatmaps(self, topk_gradients: Any, args: Any = None) -> tuple[np.ndarray, torch.Tensor]:
        """(RGB (k, H, W, 3), maps (k, H, W)) of the top-k classes on the scale args.hm_diff picks (joint)."""
        a = resolve_args(args or {})
        maps = heatmaps.explanation_maps(self._stack(topk_gradients), a.hm_diff)["class"]
        return heatmaps.to_rgb(maps, a.cmap), maps

    def get_joint_diff_heatmaps(self, topk_gradients: Any, args: Any = None) -> tuple[np.ndarray, torch.Tensor]:
        """(RGB (2, k-1, H, W, 3), maps (2, k-1, H, W)): [0] = diff (top − i), [1] = invDiff (i − top)."""
        a = resolve_args(args or {})
        m = heatmaps.explanation_maps(self._stack(topk_gradients), a.hm_diff)
        if "diff" not in m:
            raise ValueError("difference heatmaps need the attributions of at least 2 classes (topk >= 2)")
        maps = torch.stack([m["diff"], m["invDiff"]])
        return heatmaps.to_rgb(maps, a.cmap), maps

    overlay = staticmethod(heatmaps.overlay)
    save_figure = staticmethod(heatmaps.save_figure)


class UntangleAI:
    """Drop-in for the tutorial's ``UntangleAI`` object (SPEC §3)."""

    # ------------------------------------------------------------------ estimation

    def estimate_signals(self, model: nn.Module, signal_store_path: str, train_loader_fun: Callable[[Any], Iterable],
                         args: Any, overwrite: bool = False, **options: Any) -> dict[int, Path]:
        """Estimate per-class signals and write ``f"{signal_store_path}_class_{c}.pkl"`` for args.data_class
        (or every class). ``train_loader_fun`` gets the class as the tutorial passes it (args.data_class as
        written, else ``str(c)``). Classes whose file already matches this model are skipped (resume).
        ``options`` go to :class:`SignalEstimator` (e.g. ``position_rate``)."""
        a = resolve_args(args)
        estimator = SignalEstimator(model, a.classes, **options)
        check_model(estimator.program, a)
        label = (dict(zip(a.classes, self._as_list(a.data_class))) if a.classes
                 else {c: str(c) for c in estimator.classes})
        _check_prefix(signal_store_path)
        with warnings.catch_warnings():  # an empty class is an error here (below), not also a warning
            warnings.simplefilter("ignore", EmptyClassWarning)
            written = estimator.fit_to_files(
                signal_store_path, lambda c: _CheckedLoader(train_loader_fun(label[c]), a.img_size, label[c]),
                overwrite)
        empty = [label[c] for c in estimator.classes if c not in written]
        if empty:
            raise InputError(f"the loaders of classes {empty} yielded no images; no store was written for them. "
                             "Check train_loader_fun for these classes (the tutorial asked for their files)")
        return written

    @staticmethod
    def _as_list(data_class: Any) -> list:
        return list(data_class) if isinstance(data_class, (list, tuple, set, range)) else [data_class]

    def signal_estimator(self, model: nn.Module, classes: Optional[Sequence[int]] = None, **kwargs) -> SignalEstimator:
        """The native estimator (one pass over one loader estimates every class)."""
        return SignalEstimator(model, classes, **kwargs)

    # ----------------------------------------------------------------- attribution

    def signal_attribution(self, model: nn.Module, signal_store_path: str, classes: Optional[Sequence[int]] = None,
                           cache_size: int = 64) -> Attributor:
        """The native attributor over the stores of ``classes`` (default: every class with a store file), read
        lazily: an explanation reads only the classes it needs, at most ``cache_size`` held (LRU;
        :meth:`Attributor.from_prefix`)."""
        num_classes = Program(model).num_outputs
        ids = validation.class_ids(classes, num_classes, "classes")
        if ids is None:
            _check_prefix(signal_store_path)
            ids = [c for c in range(num_classes) if class_store_path(signal_store_path, c).is_file()]
            if not ids:
                raise FileNotFoundError(
                    f"no signal store {os.fspath(signal_store_path)}_class_<c>.pkl exists for any of the model's "
                    f"{num_classes} classes. Run UntangleAI().estimate_signals(model, {str(signal_store_path)!r}, "
                    "train_loader_fun, args) first")
        check_store_files(signal_store_path, ids)
        return Attributor.from_prefix(model, signal_store_path, ids, cache_size=cache_size)

    def get_topk_pred(self, model: nn.Module, input: torch.Tensor,  # noqa: A002 (the tutorial's name)
                      ID2Name_Map: Optional[Mapping[Any, str]], topk: int) -> loaders.TopK:
        """Top-k (logits, probabilities, class names, class ids) of one image."""
        return loaders.get_topk_pred(model, input, ID2Name_Map, topk)

    def attribute_signals(self, model: nn.Module, input_tensor: torch.Tensor, input_tensor_true: Any,
                          signal_store_path: str, ID2Name_Map: Optional[Mapping[Any, str]], args: Any,
                          out_prefix: str) -> list[Path]:
        """Explain one image for its top-k classes (ONE batched reverse pass) and write the tutorial's files.

        JPEGs ``{out_prefix}_class_{i}.JPEG`` (i < topk) and, for topk > 1, ``{out_prefix}_diff_class_{i}.JPEG``
        and ``{out_prefix}_invDiff_class_{i}.JPEG`` (1 ≤ i < topk), overlaid on ``input_tensor_true`` (H×W×C
        tensor / ndarray / PIL; None = the input itself); with args.json one ``{out_prefix}.json`` instead.
        Returns the written paths.
        """
        a = resolve_args(args)
        x = validation.one_image(input_tensor, a.img_size, "input_tensor")
        attributor = attributor_for(model, a)
        logits, probs, names, ids = loaders.topk_pred(attributor.program, x, ID2Name_Map, a.topk, "args.topk")
        add_stores(attributor, model, signal_store_path, ids)
        explanation = attributor.explain(x, target=torch.tensor([ids]))
        maps = heatmaps.explanation_maps(explanation.attributions[0].cpu(), a.hm_diff)
        if a.json:
            return [self._write_json(out_prefix, a, maps, logits, probs, names, ids)]
        image = x[0].cpu() if input_tensor_true is None else input_tensor_true
        return self._write_images(out_prefix, a, maps, image, probs, names, ids)

    @staticmethod
    def _titles(kind: str, probs: list[float], names: list[str], ids: list[int]) -> list[str]:
        if kind == "class":
            return [f"top-{i + 1}: {n} [{c}]  p={p:.3f}" for i, (n, c, p) in enumerate(zip(names, ids, probs))]
        pairs = [(names[0], n) for n in names[1:]]
        return [f"{kind}: {x} - {y}" if kind == "diff" else f"{kind}: {y} - {x}" for x, y in pairs]  # PIL's font: ASCII

    def _write_images(self, out_prefix: str, a: CompatArgs, maps: dict[str, torch.Tensor], image: Any,
                      probs: list[float], names: list[str], ids: list[int]) -> list[Path]:
        scale = "joint scale" if a.hm_diff == "joint" else "own scale"
        paths = []
        for kind, stack in maps.items():
            first = 0 if kind == "class" else 1
            for j, (m, title) in enumerate(zip(stack, self._titles(kind, probs, names, ids))):
                rgb = heatmaps.overlay(heatmaps.to_rgb(m, a.cmap), image)
                path = f"{out_prefix}_{FILE_KIND[kind]}class_{j + first}.JPEG"
                paths.append(heatmaps.save_panel(path, rgb, title, a.cmap, label=f"attribution ({scale})"))
        return paths

    @staticmethod
    def _write_json(out_prefix: str, a: CompatArgs, maps: dict[str, torch.Tensor], logits: list[float],
                    probs: list[float], names: list[str], ids: list[int]) -> Path:
        payload = {
            "format": "untangle_ext.attribution", "format_version": 1, "model": a.mname, "topk": a.topk,
            "hm_diff": a.hm_diff, "image_size": list(maps["class"].shape[1:]),
            "classes": [{"rank": i, "id": c, "name": n, "probability": p, "logit": l}
                        for i, (c, n, p, l) in enumerate(zip(ids, names, probs, logits))],
            "probabilities": probs, "logits": logits,  # of the top-k classes only, in rank order (README)
            "maps": {kind: heatmaps.maps_to_lists(stack) for kind, stack in maps.items()},
        }
        return heatmaps.save_json(f"{os.fspath(out_prefix)}.json", payload)

    # ---------------------------------------------------------------- visualisation

    def get_heatmap(self, signal_nhwc: Any, cmap: Any = "seismic") -> np.ndarray:
        """RGB heatmaps (N, H, W, 3) in [0, 1] of attributions (N, H, W, C): seismic, 0 = white."""
        return heatmaps.heatmap_rgb(signal_nhwc, cmap)

    def visualization(self) -> Visualization:
        """Joint / difference heatmap helpers."""
        return Visualization()

    def slider(self, attribution: Any, image: Any = None, path: str = "threshold_sweep.png", cmap: Any = "seismic"):
        """Importance-threshold slider (ipywidgets) or, without ipywidgets, a static threshold-sweep figure."""
        return slider.slider(attribution, image=image, path=path, cmap=cmap)

    # ---------------------------------------------------------------------- loaders

    def load_mnist_per_class(self, batch_size: int, data_class: Any = None, **kwargs):
        """(loader, dataset) of MNIST images of ``data_class`` (see :func:`.loaders.load_mnist_per_class`)."""
        return loaders.load_mnist_per_class(batch_size, data_class, **kwargs)

    def load_imagenet_per_class(self, batch_size: int, data_path: str, synset_map: Any, data_class: Any = None,
                                is_resnet: Any = False, **kwargs):
        """(loader, dataset) over ``data_path/<synset>/`` folders (see :mod:`untangle_ext.loaders`)."""
        return loaders.load_imagenet_per_class(batch_size, data_path, synset_map, data_class, is_resnet, **kwargs)

    def mnist_data_gen(self, batch_size: int, results_path: str, gen_images: Any = False, **kwargs):
        """Yield (names, images) over the MNIST test split; ``gen_images`` also writes them as PNGs."""
        return loaders.mnist_data_gen(batch_size, results_path, gen_images, **kwargs)
