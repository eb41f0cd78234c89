"""Signal estimation: stream data through the model, per-class moments → patterns → stores.

:class:`SignalEstimator` holds the configuration and the pure estimation core;
the file policy (resume, locks, orphans, who writes) is :mod:`untangle_ext.files`,
and how accumulators from several processes are combined is an injected
*reducer* (:mod:`untangle_ext.distributed` provides the torch.distributed one).

Reading plans for one loader of ``(image, label)`` batches (:meth:`SignalEstimator.fit`):

* the data set knows its labels (``targets``, a labels tensor, or ``labels=``): ONE
  pass, class by class through per-class batches, one class of accumulators in memory;
* otherwise: one pass per chunk of classes whose accumulators fit the memory
  budget. The number of passes is announced up front, and a one-shot iterator
  (e.g. a generator) is refused when more than one pass is needed.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed, validation
from ._progress import bars_off
from .classwise import class_loader, dataset_labels
from .files import LOCKS_PER_PASS, write_class_stores
from .moments import Moments, accumulator_bytes, slots_of
from .conditioning import Limits
from .patterns import MeanY, compute_patterns
from .subsample import PositionSampler
from .store import (ALL_CLASSES, DEFAULT_FILE_DTYPE, DEFAULT_KEEP, PATTERN_KEYS, SignalStore, layer_signature,
                    model_fingerprint)
from .trace import Program
from .validation import InputChecker, batches_of, check_labels, split_batch, warn_empty

Batches = Iterable[Sequence[torch.Tensor]]
#: Combines this process's accumulators with those of the other processes, in place (every process calls it).
Reducer = Callable[[Moments], None]


class MultiPassWarning(UserWarning):
    """The loader's data set does not expose its labels, so estimation reads it once per chunk of classes."""


def _available_memory(device: torch.device = torch.device("cpu")) -> int:
    """Bytes free now where the accumulators live: the GPU's free memory on CUDA, else MemAvailable (8 GiB if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def chunk_classes(classes: Sequence[int], per_class_bytes: int, budget: Optional[int],
                  device: torch.device = torch.device("cpu")) -> list[list[int]]:
    """Split ``classes`` into chunks whose accumulators fit ``budget`` bytes (default: half the free memory of ``device``)."""
    budget = budget if budget is not None else _available_memory(device) // 2
    size = max(1, budget // max(per_class_bytes, 1))
    return [list(classes[i:i + size]) for i in range(0, len(classes), size)]


class SignalEstimator:
    """Estimate per-class (or all-class) patterns of every Linear/ConvNd layer of ``model``.

    ``classes``: which classes to estimate (default: every output). ``per_class=False``
    estimates one store from all samples (iNNvestigate semantics). ``memory_budget``
    bounds the bytes of float64 accumulators held at once (chunked passes only).
    ``input_shape`` (e.g. ``args.img_size``) is the expected shape of one image; by default
    the first batch's shape, which every later batch must then match. ``compute_dtype``
    (default: the model's) is the dtype of the estimation forward and of the per-batch
    statistics products: float32 products summed over ~10^4-10^5 conv positions per
    batch carry 1e-6 to 1e-4 relative error into the patterns (most in ill-conditioned
    a⁻); ``torch.float64`` removes it at about twice the cost. ``store_dtype``: dtype of the
    patterns of the returned stores; ``file_dtype`` / ``keep``: how :meth:`fit_to_files`
    writes them (see :meth:`SignalStore.save`). ``leaf_modules``: module classes traced as
    single ops. ``reducer``: combines accumulators across processes (default: the
    torch.distributed all-reduce while a process group is active). ``kappa_max`` /
    ``min_samples``: a neuron whose pattern has κ = ‖a‖·‖w‖ above ``kappa_max``, or whose regime
    saw fewer than ``min_samples`` samples, gets a zero pattern (see
    :class:`untangle_ext.conditioning.Limits`). ``position_rate`` < 1 accumulates each conv layer's
    statistics from that fraction of its output positions per image, drawn by ``position_seed``
    (see :mod:`untangle_ext.subsample`). The model is never modified.
    """

    def __init__(
        self,
        model: nn.Module,
        classes: Optional[Sequence[int]] = None,
        per_class: bool = True,
        mean_y: MeanY = "all",
        memory_budget: Optional[int] = None,
        store_dtype: torch.dtype = torch.float32,
        progress: bool = True,
        input_shape: Optional[Sequence[int]] = None,
        compute_dtype: Optional[torch.dtype] = None,
        leaf_modules: Sequence[type] = (),
        file_dtype: torch.dtype = DEFAULT_FILE_DTYPE,
        keep: Sequence[str] = DEFAULT_KEEP,
        reducer: Optional[Reducer] = None,
        kappa_max: float = Limits.kappa_max,
        min_samples: int = Limits.min_samples,
        position_rate: float = 1.0,
        position_seed: int = 0,
    ):
        self.model = model
        self.program = Program(model, dtype=compute_dtype, leaf_modules=leaf_modules)
        self._checker = InputChecker(self.program, input_shape, pin=True)
        self.num_classes = self.program.num_outputs
        self.classes = validation.class_ids(classes, self.num_classes, "classes") or list(range(self.num_classes))
        self.per_class = per_class
        self.limits = Limits(kappa_max, min_samples)
        self.mean_y = validation.check_mean_y(mean_y)
        self.memory_budget = memory_budget
        self.store_dtype = store_dtype
        self.progress = progress
        self.file_dtype = file_dtype
        self.keep = tuple(keep)
        self.reducer = reducer
        self.positions = PositionSampler(position_rate, position_seed)
        self._fingerprint: Optional[str] = None

    @property
    def device(self) -> torch.device:
        return self.program.layers[0].weight.device

    @property
    def fingerprint(self) -> str:
        """The model's fingerprint, computed once per estimator (the model must not change meanwhile)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def _reduce(self, moments: Moments) -> None:
        (self.reducer or distributed.reducer())(moments)

    # ------------------------------------------------------------------ the pure core: batches → moments → stores

    def _accumulate(self, moments: Moments, batches: Batches, slots_fn, desc: str, shard: bool = True) -> int:
        """Add ``batches`` (this process's shard of them when ``shard``) to ``moments``, each batch validated;
        return the number of images seen."""
        batches = batches_of(batches, f"the loader ({desc})")
        bar = tqdm(distributed.shard_batches(batches) if shard else batches, desc=desc,
                   disable=bars_off(self.progress), leave=False)
        seen = 0
        for i, batch in enumerate(bar):
            x, labels = self._batch(batch, f"{desc}, batch {i}")
            moments.update(x, slots_fn(labels, x))
            seen += x.shape[0]
        return seen

    def _batch(self, batch, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, labels = split_batch(batch, where)
        x = self._checker.images(x, where)
        return x, check_labels(labels, x.shape[0], self.num_classes, where)

    def _slots_of(self, labels: torch.Tensor, chunk: list[int]) -> torch.Tensor:
        """Map labels to accumulator slots of ``chunk`` (-1 = not in this chunk)."""
        labels = torch.as_tensor(labels, device=self.device).long().view(-1)
        if chunk == [ALL_CLASSES]:
            return torch.zeros_like(labels)
        return slots_of(labels, chunk, self.num_classes)

    def _stores(self, moments: Moments, chunk: list[int], share: Optional[set[int]] = None,
                keys: Sequence[str] = PATTERN_KEYS) -> Iterator[tuple[int, SignalStore]]:
        """One store per class of ``chunk`` (of ``share``, if given) that saw at least one sample, holding the
        patterns ``keys``; empty ones are warned about. CONSUMES ``moments``: each layer's accumulators are
        freed as soon as its last pattern is computed (the smallest layers first), so the stores being built
        replace them."""
        warn_empty([c for slot, c in enumerate(chunk) if int(moments.images[slot]) == 0])
        signature = layer_signature(self.program)
        options = {"mean_y": self.mean_y, "per_class": self.per_class, "store_dtype": str(self.store_dtype)[6:],
                   **self.limits.options(), **self._position_options()}
        todo = [(slot, c) for slot, c in enumerate(chunk)
                if int(moments.images[slot]) > 0 and (share is None or c in share)]
        names = list(moments.layers)
        order = sorted(names, key=lambda name: moments.layers[name].mat.numel())
        for i, (slot, class_id) in enumerate(todo):
            last = i == len(todo) - 1
            patterns = {name: self._patterns(moments, name, slot, last, keys) for name in order}
            patterns = {name: patterns[name] for name in names}
            yield class_id, SignalStore(class_id, patterns, signature, self.fingerprint, int(moments.images[slot]),
                                        options, input_shape=self._checker.expected)

    def _patterns(self, moments: Moments, name: str, slot: int, release: bool,
                  keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The patterns ``keys`` of one layer and class slot in the store dtype; ``release`` frees that layer's
        accumulators."""
        p = compute_patterns(moments.layers[name], slot, self.mean_y, self.store_dtype, self.limits, keys)
        if release:
            del moments.layers[name]
        return p

    def _position_options(self) -> dict:
        """Position subsampling as recorded in a store's options (nothing when every position is used)."""
        p = self.positions
        return {"position_rate": p.rate, "position_seed": p.seed} if p.rate < 1 else {}

    def iter_fit(self, loader: Batches, labels: Optional[Sequence[int]] = None,
                 classes: Optional[Sequence[int]] = None,
                 keys: Sequence[str] = PATTERN_KEYS) -> Iterator[tuple[int, SignalStore]]:
        """Estimate from one loader of ``(images, labels)``, yielding ``(class, store)`` as each class is done;
        the stores hold the patterns ``keys`` (default all three; :meth:`fit_to_files` computes only ``keep``).

        Class by class in one pass when the data set knows its labels (or ``labels`` gives them);
        otherwise one pass per chunk of classes. Under torch.distributed each process yields the
        classes it computes (a share of them: :func:`distributed.class_share`).
        """
        classes = self.classes if classes is None else list(classes)
        known = dataset_labels(loader, labels) if self.per_class else None
        if known is not None and known.numel() == 0:
            raise validation.EmptyLoaderError("the loader's data set is empty, so there is nothing to estimate; "
                                              "check the dataset (and its filters) behind the loader")
        if known is not None:
            yield from self._by_class(loader, known, distributed.class_share(classes), keys)
            return
        chunks = chunk_classes(classes, accumulator_bytes(self.program), self.memory_budget, self.device) \
            if self.per_class else [[ALL_CLASSES]]
        if len(chunks) > 1:
            if iter(loader) is loader:
                raise ValueError(
                    f"estimating {len(classes)} classes needs {len(chunks)} passes over the data (the accumulators "
                    f"of {len(chunks[0])} classes fit the memory budget), but the loader is a one-shot iterator; "
                    "pass a DataLoader whose data set has `targets` (one pass, class by class), or labels=..., or a "
                    "re-iterable loader, or a larger memory_budget")
            warnings.warn(f"the loader's data set does not expose its labels, so estimating {len(classes)} classes "
                          f"reads it {len(chunks)} times (one pass per chunk of {len(chunks[0])} classes); pass "
                          "labels=... (or a data set with `targets`) for one pass", MultiPassWarning, stacklevel=3)
        for i, chunk in enumerate(chunks):
            moments = Moments(self.program, len(chunk), self.positions)
            desc = "estimating signals" + (f" (pass {i + 1}/{len(chunks)})" if len(chunks) > 1 else "")
            seen = self._accumulate(moments, loader, lambda lab, x: self._slots_of(lab, chunk), desc)
            if i == 0 and seen == 0 and distributed.current() is None:
                raise validation.EmptyLoaderError("the loader yielded no images, so there is nothing to estimate; "
                                                  "check the dataset (and its filters / sampler) behind the loader")
            self._reduce(moments)
            share = set(distributed.class_share(chunk))
            yield from self._stores(moments, chunk, share, keys)
            del moments

    def _by_class(self, loader, labels: torch.Tensor, classes: list[int],
                  keys: Sequence[str]) -> Iterator[tuple[int, SignalStore]]:
        """One pass over ``classes``' samples, class after class; one class of accumulators at a time."""
        warn_empty([c for c in classes if not bool((labels == c).any())])
        per_class, schedule = class_loader(loader, labels, classes)
        bar = tqdm(per_class, desc="estimating signals (class by class)", disable=bars_off(self.progress),
                   leave=False)
        moments = None
        for i, (batch, c) in enumerate(zip(bar, schedule)):
            x, got = self._batch(batch, f"class {c}, batch {i}")
            del batch
            if bool((got != c).any()):
                raise ValueError(f"class {c}, batch {i}: the batch has labels {sorted(set(got.tolist()))[:5]} but the "
                                 f"data set's labels say class {c}; the labels must list each sample's class in "
                                 "the data set's index order")
            if moments is None:
                moments = Moments(self.program, 1, self.positions)
            moments.update(x, torch.zeros(x.shape[0], dtype=torch.long, device=self.device))
            if i + 1 == len(schedule) or schedule[i + 1] != c:  # the class's last batch: free it, then its stores
                del x, got
                yield from self._stores(moments, [c], keys=keys)
                moments = None

    def fit(self, loader: Batches, labels: Optional[Sequence[int]] = None) -> dict[int, SignalStore]:
        """Estimate from one loader of ``(images, labels)``: ``{class: store}`` (see :meth:`iter_fit`)."""
        return dict(self.iter_fit(loader, labels))

    def iter_fit_per_class(self, loader_fn: Callable[[int], Batches], classes: Optional[Sequence[int]] = None,
                           keys: Sequence[str] = PATTERN_KEYS) -> Iterator[tuple[int, SignalStore]]:
        """Estimate each class from its own loader ``loader_fn(c)`` (stores holding the patterns ``keys``); under
        torch.distributed each process estimates its share of the classes alone (whole loaders, no collectives)."""
        classes = self.classes if classes is None else list(classes)
        mine = distributed.class_share(classes)
        for c in tqdm(mine, desc="classes", disable=bars_off(self.progress and len(mine) > 1)):
            moments = Moments(self.program, 1, self.positions)
            batches = loader_fn(c)
            distributed.check_whole(batches, c)
            self._accumulate(moments, batches, lambda lab, x: x.new_zeros(x.shape[0], dtype=torch.long),
                             f"class {c}", shard=False)
            yield from self._stores(moments, [c], keys=keys)
            del moments

    def fit_per_class(self, loader_fn: Callable[[int], Batches]) -> dict[int, SignalStore]:
        """Estimate each class from its own loader ``loader_fn(c)`` (the tutorial's style)."""
        return dict(self.iter_fit_per_class(loader_fn))

    def fit_to_files(self, prefix: "os.PathLike[str] | str", source: "Callable[[int], Batches] | Batches",
                     overwrite: bool = False, lock_timeout: Optional[float] = None,
                     labels: Optional[Sequence[int]] = None) -> dict[int, Path]:
        """Estimate and write ``{prefix}_class_{c}.pkl`` for every class, each as soon as it is done.

        ``source``: per-class loaders ``loader_fn(c)`` (the tutorial's style) or one loader of a
        labelled data set (one pass, class by class). Resume, locks and who writes: :mod:`untangle_ext.files`.
        """
        if callable(source) and not hasattr(source, "__iter__"):
            return write_class_stores(self, prefix, lambda cs: self.iter_fit_per_class(source, cs, self.keep),
                                      overwrite, lock_timeout)
        if dataset_labels(source, labels) is None:
            raise ValueError("fit_to_files needs per-class loaders (a function of the class) or a DataLoader "
                             "whose data set knows its labels (`targets`, a 2-tensor TensorDataset, or labels=)")
        return write_class_stores(self, prefix, lambda cs: self.iter_fit(source, labels, cs, self.keep), overwrite,
                                  lock_timeout, group=LOCKS_PER_PASS)


def estimate(
    model: nn.Module, loader: Batches, **kwargs
) -> Mapping[int, SignalStore]:
    """One-call form of ``SignalEstimator(model, **kwargs).fit(loader)``."""
    return SignalEstimator(model, **kwargs).fit(loader)
