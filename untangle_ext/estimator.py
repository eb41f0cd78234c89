"""Signal estimation: stream a loader through the model once, per-class moments → patterns → stores.

:class:`SignalEstimator` estimates every class in ONE pass over a loader of
``(image, label)`` batches. When the float64 accumulators of all classes do not
fit the memory budget, classes are processed in chunks (one pass per chunk).
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed
from .moments import Moments, accumulator_bytes, slots_of
from .conditioning import Limits
from .patterns import MeanY, compute_patterns
from .locking import ClassLock
from ._io import remove_orphan_temps
from .store import ALL_CLASSES, SignalStore, StoreError, class_store_path, layer_signature, model_fingerprint
from .trace import Program
from .validation import InputChecker, batches_of, check_labels, split_batch, warn_empty

Batches = Iterable[Sequence[torch.Tensor]]


def _available_memory() -> int:
    """Bytes of memory available now (MemAvailable), or 8 GiB where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def chunk_classes(classes: Sequence[int], per_class_bytes: int, budget: Optional[int]) -> list[list[int]]:
    """Split ``classes`` into chunks whose accumulators fit ``budget`` bytes (default: half the free RAM)."""
    budget = budget if budget is not None else _available_memory() // 2
    size = max(1, budget // max(per_class_bytes, 1))
    return [list(classes[i:i + size]) for i in range(0, len(classes), size)]


class SignalEstimator:
    """Estimate per-class (or all-class) patterns of every Linear/ConvNd layer of ``model``.

    ``classes``: which classes to estimate (default: every output). ``per_class=False``
    estimates one store from all samples (iNNvestigate semantics). ``memory_budget``
    bounds the bytes of float64 accumulators held at once. ``input_shape`` (e.g.
    ``args.img_size``) is the expected shape of one image; by default the first
    batch's shape, which every later batch must then match. ``compute_dtype``
    (default: the model's) is the dtype of the estimation forward and of the per-batch
    statistics products: float32 products summed over ~10^4-10^5 conv positions per
    batch carry 1e-6 to 1e-4 relative error into the patterns (most in ill-conditioned
    a⁻); ``torch.float64`` removes it at about twice the cost. ``leaf_modules``: module classes
    traced as single ops (reversed with their gradient), e.g. blocks fx cannot trace.
    ``kappa_max`` / ``min_samples``: a neuron whose pattern has κ = ‖a‖·‖w‖ above ``kappa_max``, or
    whose regime saw fewer than ``min_samples`` samples, gets a zero pattern (see
    :class:`untangle_ext.conditioning.Limits`). The model is never modified.
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
        kappa_max: float = Limits.kappa_max,
        min_samples: int = Limits.min_samples,
    ):
        self.model = model
        self.program = Program(model, dtype=compute_dtype, leaf_modules=leaf_modules)
        self._checker = InputChecker(self.program, input_shape, pin=True)
        self.num_classes = self.program.num_outputs
        self.classes = list(range(self.num_classes)) if classes is None else [int(c) for c in classes]
        bad = [c for c in self.classes if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"classes {bad} are out of range: the model has {self.num_classes} outputs")
        if mean_y not in ("all", "positive"):
            raise ValueError(f"mean_y must be 'all' or 'positive', not {mean_y!r}")
        self.per_class = per_class
        self.limits = Limits(kappa_max, min_samples)
        self.mean_y = mean_y
        self.memory_budget = memory_budget
        self.store_dtype = store_dtype
        self.progress = progress

    @property
    def device(self) -> torch.device:
        return self.program.layers[0].weight.device

    def _chunks(self) -> list[list[int]]:
        if not self.per_class:
            return [[ALL_CLASSES]]
        return chunk_classes(self.classes, accumulator_bytes(self.program), self.memory_budget)

    def _slots_of(self, labels: torch.Tensor, chunk: list[int]) -> torch.Tensor:
        """Map labels to accumulator slots of ``chunk`` (-1 = not in this chunk)."""
        labels = torch.as_tensor(labels, device=self.device).long().view(-1)
        if chunk == [ALL_CLASSES]:
            return torch.zeros_like(labels)
        return slots_of(labels, chunk, self.num_classes)

    def _run(self, moments: Moments, batches: Batches, slots_fn, desc: str) -> None:
        """Accumulate this rank's shard of ``batches``, each batch validated; under torch.distributed, sum all ranks'."""
        shard = distributed.shard_batches(batches_of(batches, f"the loader ({desc})"))
        bar = tqdm(shard, desc=desc, disable=not (self.progress and distributed.is_main()), leave=False)
        for i, batch in enumerate(bar):
            where = f"{desc}, batch {i}"
            x, labels = split_batch(batch, where)
            x = self._checker.images(x, where)
            labels = check_labels(labels, x.shape[0], self.num_classes, where)
            moments.update(x, slots_fn(labels, x))
        distributed.all_reduce_moments(moments)

    def fit(self, loader: Batches) -> dict[int, SignalStore]:
        """Estimate from one loader of ``(images, labels)``: one pass per chunk of classes."""
        stores: dict[int, SignalStore] = {}
        chunks = self._chunks()
        for i, chunk in enumerate(chunks):
            moments = Moments(self.program, len(chunk))
            desc = "estimating signals" + (f" (chunk {i + 1}/{len(chunks)})" if len(chunks) > 1 else "")
            self._run(moments, loader, lambda labels, x: self._slots_of(labels, chunk), desc)
            stores.update(self._stores(moments, chunk))
        return stores

    def fit_per_class(self, loader_fn: Callable[[int], Batches]) -> dict[int, SignalStore]:
        """Estimate each class from its own loader ``loader_fn(c)`` (the tutorial's style)."""
        stores: dict[int, SignalStore] = {}
        for c in tqdm(self.classes, desc="classes", disable=not self.progress or len(self.classes) == 1):
            moments = Moments(self.program, 1)
            self._run(moments, loader_fn(c), lambda labels, x: x.new_zeros(x.shape[0], dtype=torch.long),
                      f"class {c}")
            stores.update(self._stores(moments, [c]))
        return stores

    def fit_to_files(self, prefix: "os.PathLike[str] | str", loader_fn: Callable[[int], Batches],
                     overwrite: bool = False, lock_timeout: Optional[float] = None) -> dict[int, Path]:
        """Estimate class by class, writing each store as soon as it is done.

        Classes whose store already exists and matches this model are skipped
        unless ``overwrite`` (so an interrupted run resumes where it stopped).
        Each class is estimated under a lock file: processes sharing a prefix
        split the classes between them, and a class another process is working
        on is waited for (up to ``lock_timeout`` s) instead of estimated twice.
        Under torch.distributed the ranks go through the classes in lockstep
        (no locks); rank 0 decides what is current and writes, the others wait.
        """
        fingerprint = model_fingerprint(self.model)
        fresh_since = time.time_ns() if overwrite else None  # with overwrite, only files written from now count
        written: dict[int, Path] = {}
        busy = []
        for c in tqdm(self.classes, desc="classes", disable=not self.progress):
            path = class_store_path(prefix, c)
            if distributed.main_decides(self._is_current, path, fingerprint, c, fresh_since):
                written[c] = path
                continue
            lock = ClassLock.try_acquire(path, enabled=distributed.current() is None)
            if lock is None:
                busy.append(c)  # another process is estimating it: come back at the end
                continue
            with lock:
                self._class_to_file(c, path, loader_fn, fingerprint, fresh_since, written)
        for c in busy:
            path = class_store_path(prefix, c)
            with ClassLock.acquire(path, lock_timeout):
                self._class_to_file(c, path, loader_fn, fingerprint, fresh_since, written)
        distributed.barrier()
        return written

    def _class_to_file(self, c: int, path: Path, loader_fn: Callable[[int], Batches], fingerprint: str,
                       fresh_since: Optional[int], written: dict[int, Path]) -> None:
        """Estimate class ``c`` into ``path`` unless (under the lock) another process just did."""
        if distributed.main_decides(self._is_current, path, fingerprint, c, fresh_since):
            written[c] = path
            return
        if distributed.is_main():
            reason = self._not_current(path, fingerprint, c, fresh_since)
            if fresh_since is None and path.exists():
                warnings.warn(f"replacing {path}: {reason}", UserWarning, stacklevel=3)
            remove_orphan_temps(path)
        one = copy.copy(self)
        one.classes = [c]
        stores = one.fit_per_class(loader_fn)
        if c not in stores:
            return
        if distributed.is_main():
            stores[c].save(path)
        written[c] = path

    def _is_current(self, path: Path, fingerprint: str, class_id: int, fresh_since: Optional[int]) -> bool:
        return self._not_current(path, fingerprint, class_id, fresh_since) is None

    def _not_current(self, path: Path, fingerprint: str, class_id: int, fresh_since: Optional[int]) -> Optional[str]:
        """Why ``path`` is not a valid store of ``class_id`` for this model (written after ``fresh_since``), or None."""
        try:
            if fresh_since is not None and path.stat().st_mtime_ns < fresh_since:
                return "overwrite=True"
            SignalStore.load(path, expected_class=class_id).check_matches(self.program, fingerprint)
        except (OSError, StoreError) as exc:
            return str(exc)
        return None

    def _stores(self, moments: Moments, chunk: list[int]) -> dict[int, SignalStore]:
        """Turn accumulated moments into one store per class that saw at least one sample."""
        fingerprint = model_fingerprint(self.model)
        signature = layer_signature(self.program)
        out: dict[int, SignalStore] = {}
        warn_empty([c for slot, c in enumerate(chunk) if int(moments.images[slot]) == 0])
        options = {"mean_y": self.mean_y, "per_class": self.per_class, "store_dtype": str(self.store_dtype)[6:],
                   **self.limits.options()}
        for slot, class_id in enumerate(chunk):
            images = int(moments.images[slot])
            if images == 0:
                continue
            patterns = {}
            for name, lm in moments.layers.items():
                p = compute_patterns(lm, slot, self.mean_y, self.limits)
                patterns[name] = {k: (v.to(self.store_dtype) if k.startswith("a_") else v) for k, v in p.items()}
            out[class_id] = SignalStore(class_id, patterns, signature, fingerprint, images, options,
                                        input_shape=self._checker.expected)
        return out


def estimate(
    model: nn.Module, loader: Batches, **kwargs
) -> Mapping[int, SignalStore]:
    """One-call form of ``SignalEstimator(model, **kwargs).fit(loader)``."""
    return SignalEstimator(model, **kwargs).fit(loader)
