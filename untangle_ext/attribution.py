"""Attribution: one forward, then one reverse pass for all (image, class) pairs.

Each pair ``(b, c)`` is reversed through the patterns of class ``c`` (or of
the all-class store) with image ``b``'s recorded gates (SPEC §2):

* ``pattern_attribution`` (default): Linear/ConvNd use ``W ⊙ a⁺_c``,
* ``patternnet``: they use ``a⁺_c`` (the signal),
* ``gradient``: they use ``W`` (plain gradient, the S_w baseline; no store needed).

``estimator`` picks the pattern: ``positive`` (a⁺ in every layer, SPEC §2's default), ``linear``
(a everywhere) or ``gated``: a⁺ where the layer's output is split by sign downstream (it feeds a
ReLU-like activation, or is the model's output: :attr:`Program.sign_gated`), a elsewhere — e.g. a
residual branch's last conv, whose own sign gates nothing (its ReLU comes after the addition).

Every other op follows :mod:`untangle_ext.rules`. The pass keeps each pair's
signal normalised by exact powers of two, so deep nets never overflow: where a
map is representable in the input dtype it is returned exactly, else it is
returned normalised with its ``scale_exponent`` (and a warning says so).
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .moments import slots_of
from .store import ALL_CLASSES, DEFAULT_MAX_BYTES, SignalStore, StoreError, class_store_path, model_fingerprint
from .layers import AffineLayer
from .rules import Tape
from .trace import Program
from .validation import InputChecker, check_topk

Method = Literal["pattern_attribution", "patternnet", "gradient"]
METHODS = ("pattern_attribution", "patternnet", "gradient")
Estimator = Literal["positive", "linear", "gated"]
ESTIMATORS = ("positive", "linear", "gated")


def pattern_keys(program: Program, estimator: Estimator) -> dict[str, str]:
    """The stored pattern (``a_pos`` or ``a_lin``) each affine layer of ``program`` reverses through under ``estimator``."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, not {estimator!r}")
    gated = program.sign_gated if estimator == "gated" else frozenset()
    return {l.name: "a_pos" if estimator == "positive" or l.name in gated else "a_lin" for l in program.layers}


def _needed(keys: dict[str, str]) -> tuple[str, ...]:
    return tuple(sorted(set(keys.values())))


@dataclass
class Explanation:
    """Attributions of B images for k classes each, with the model's outputs."""

    attributions: torch.Tensor  # (B, k, *input_shape)
    targets: torch.Tensor  # (B, k) class ids
    logits: torch.Tensor  # (B, num_classes)
    #: (B, k) int64: the true map is ``attributions * 2**scale_exponent``; 0 wherever the map is exact.
    scale_exponent: Optional[torch.Tensor] = None

    @property
    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=1)

    def __repr__(self) -> str:
        """Shapes and the target classes, not the tensors (a repr of two images was 4 KB)."""
        shown = self.targets[:4].tolist()
        more = f" … ({self.targets.shape[0]} images)" if self.targets.shape[0] > 4 else ""
        return (f"Explanation(attributions={tuple(self.attributions.shape)} {str(self.attributions.dtype)[6:]}, "
                f"targets={shown}{more}, logits={tuple(self.logits.shape)})")


class StoreSet:
    """Per-class stores under a prefix (``{prefix}_class_{c}.pkl``), read on first use, at most ``cache_size`` held.

    Only the patterns named in ``keys`` are read (v2 files read just those tensors). The
    least recently used class is dropped when a new one is loaded (a call that needs more
    classes than ``cache_size`` holds them all for that call). Each store is checked when it
    is loaded: its class, and that it was estimated for the attributor's model.
    """

    def __init__(self, prefix: "os.PathLike[str] | str", classes: Iterable[int], cache_size: int = 64,
                 keys: Sequence[str] = ("a_pos",), max_bytes: Optional[int] = DEFAULT_MAX_BYTES):
        if int(cache_size) < 1:
            raise ValueError(f"cache_size must be >= 1, not {cache_size}")
        self.prefix, self.classes = prefix, sorted(int(c) for c in classes)
        self.cache_size, self.keys, self.max_bytes = int(cache_size), tuple(keys), max_bytes
        self._cache: OrderedDict[int, SignalStore] = OrderedDict()
        self.loads = 0  # how many files were read (for tests and measurements)

    def get(self, class_id: int, check=None) -> SignalStore:
        """The store of ``class_id``, from the cache or read now (then ``check(store)`` runs before caching)."""
        if class_id in self._cache:
            self._cache.move_to_end(class_id)
            return self._cache[class_id]
        if class_id not in self.classes:
            raise KeyError(f"no signal store for class {class_id} in this store set (it holds "
                           f"{len(self.classes)} classes under {self.prefix})")
        store = SignalStore.load(class_store_path(self.prefix, class_id), expected_class=class_id,
                                 max_bytes=self.max_bytes, keys=self.keys)
        self.loads += 1
        if check is not None:
            check(store)
        self._cache[class_id] = store
        return store

    def trim(self) -> None:
        """Drop least recently used stores beyond ``cache_size``."""
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    @property
    def cached(self) -> list[int]:
        return list(self._cache)


class Attributor:
    """Explain a model's predictions with PatternAttribution, PatternNet or the gradient.

    ``stores`` maps class ids to :class:`SignalStore` (or is one all-class store, or a lazy
    :class:`StoreSet`: see :meth:`from_prefix`); it may be omitted for ``method="gradient"``. Inputs must have the per-image shape
    ``input_shape`` (default: the shape the stores were estimated on). ``constant_gates=True``
    holds gating factors (sigmoid/softmax outputs multiplied into an activation, as in
    squeeze-excitation and attention) constant instead of reversing their gradient.
    ``leaf_modules``: module classes traced as single ops. The model is never modified.
    """

    def __init__(
        self,
        model: nn.Module,
        stores: Union[SignalStore, Mapping[int, SignalStore], StoreSet, None] = None,
        check_fingerprint: bool = True,
        input_shape: Optional[Sequence[int]] = None,
        constant_gates: bool = False,
        leaf_modules: Sequence[type] = (),
    ):
        self.program = Program(model, leaf_modules=leaf_modules)
        self.constant_gates = constant_gates
        if isinstance(stores, SignalStore):
            stores = {stores.class_id: stores}
        self.lazy: Optional[StoreSet] = stores if isinstance(stores, StoreSet) else None
        self.stores: dict[int, SignalStore] = {} if self.lazy else dict(stores or {})
        self._fingerprint = model_fingerprint(model) if ((self.stores or self.lazy) and check_fingerprint) else None
        for c, store in self.stores.items():
            store.check_class(c)
            store.check_matches(self.program, self._fingerprint)
        if self.lazy is not None and input_shape is None and self.lazy.classes:
            input_shape = self.lazy.get(self.lazy.classes[0], self._check_lazy).input_shape
        self._checker = InputChecker(self.program, input_shape or _stores_input_shape(self.stores.values()))
        self._banks: dict[tuple[str, str], tuple[dict[str, torch.Tensor], dict[int, int]]] = {}
        self._slots: dict[tuple[str, str], tuple[dict[str, torch.Tensor], OrderedDict[int, int]]] = {}

    @classmethod
    def from_prefix(cls, model: nn.Module, prefix: "os.PathLike[str] | str", classes: Optional[Iterable[int]] = None,
                    cache_size: int = 64, estimator: Estimator = "positive", **kwargs) -> "Attributor":
        """An attributor over the stores ``{prefix}_class_{c}.pkl`` of ``classes`` (default: every output),
        each read when an explanation first needs it, at most ``cache_size`` held (LRU)."""
        program = Program(model, leaf_modules=kwargs.get("leaf_modules", ()))
        classes = range(program.num_outputs) if classes is None else classes
        return cls(model, StoreSet(prefix, classes, cache_size, keys=_needed(pattern_keys(program, estimator))),
                   **kwargs)

    def _check_lazy(self, store: SignalStore) -> None:
        store.check_matches(self.program, self._fingerprint)
        expected = getattr(self, "_checker", None)
        if expected is not None and expected.expected is not None and store.input_shape is not None \
                and tuple(store.input_shape) != tuple(expected.expected):
            raise StoreError(f"{store.source} was estimated on images of shape {tuple(store.input_shape)}, the other "
                             f"stores on {tuple(expected.expected)}; use stores from one estimation run")

    @property
    def num_classes(self) -> int:
        return self.program.num_outputs

    def _bank(self, method: Method, estimator: Estimator) -> tuple[dict[str, torch.Tensor], dict[int, int]]:
        """Per-layer reverse weights stacked over classes (S, K, ...) and the class → slot map."""
        key = (method, estimator)
        if key in self._banks:
            return self._banks[key]
        layers = self.program.layers
        if method == "gradient":
            bank = {l.name: l.weight.unsqueeze(0) for l in layers}
            self._banks[key] = (bank, {})
            return self._banks[key]
        if not self.stores:
            raise ValueError(f"method {method!r} needs signal stores; estimate them first or use method='gradient'")
        self._banks[key] = self._stack([self.stores[c] for c in sorted(self.stores)], method, estimator)
        return self._banks[key]

    def _stack(self, stores: list[SignalStore], method: Method,
               estimator: Estimator) -> tuple[dict[str, torch.Tensor], dict[int, int]]:
        """Per-layer reverse weights of ``stores`` stacked (S, K, ...), and the class → slot map."""
        keys = pattern_keys(self.program, estimator)
        for store in stores:
            store.check_keys(_needed(keys))
        bank = {}
        for l in self.program.layers:
            a = torch.stack([s.patterns[l.name][keys[l.name]] for s in stores]).to(l.weight)
            bank[l.name] = a * l.weight.unsqueeze(0) if method == "pattern_attribution" else a
        return bank, {s.class_id: i for i, s in enumerate(stores)}

    def _lazy_bank(self, targets: torch.Tensor, method: Method,
                   estimator: Estimator) -> tuple[dict[str, torch.Tensor], dict[int, int]]:
        """A bank of ``cache_size`` class slots, filled through the LRU store set as classes are first needed.

        A class read from disk is copied into a free slot (or the least recently used one), so a
        call whose classes are all held stacks nothing; one that needs more classes than slots
        gets a bank of its own classes for that call.
        """
        needed = sorted(set(targets.reshape(-1).tolist()))
        if self.lazy.keys != _needed(pattern_keys(self.program, estimator)):
            raise ValueError(f"this attributor reads {self.lazy.keys} patterns; build it with "
                             f"Attributor.from_prefix(..., estimator={estimator!r})")
        if len(needed) > self.lazy.cache_size:
            stores = [self.lazy.get(c, self._check_lazy) for c in needed]
            self.lazy.trim()
            return self._stack(stores, method, estimator)
        bank, slot_of = self._slots.setdefault((method, estimator), ({}, OrderedDict()))
        for c in needed:
            if c in slot_of:
                slot_of.move_to_end(c)
                continue
            one, _ = self._stack([self.lazy.get(c, self._check_lazy)], method, estimator)
            self.lazy.trim()
            slot = slot_of.popitem(last=False)[1] if len(slot_of) >= self.lazy.cache_size else len(slot_of)
            for name, t in one.items():
                if name not in bank:
                    bank[name] = t.new_zeros((self.lazy.cache_size, *t.shape[1:]))
                bank[name][slot] = t[0]
            slot_of[c] = slot
        return bank, dict(slot_of)

    def _pair_slots(self, targets: torch.Tensor, slot_of: dict[int, int], method: Method) -> torch.Tensor:
        flat = targets.reshape(-1)
        if method == "gradient" or ALL_CLASSES in slot_of:
            return torch.zeros_like(flat)
        missing = sorted(set(flat.tolist()) - set(slot_of))
        if missing:
            raise KeyError(f"no signal store for classes {missing}; estimate those classes first "
                           f"(stores exist for {sorted(slot_of)})")
        return slots_of(flat, sorted(slot_of, key=slot_of.get), self.num_classes)  # position = slot

    def _targets(self, logits: torch.Tensor, target, topk: int) -> torch.Tensor:
        """(B, k) class ids: the top-k predictions, or the given targets."""
        b = logits.shape[0]
        if target is None:
            return logits.topk(check_topk(topk, self.num_classes), dim=1).indices
        t = torch.as_tensor(target, device=logits.device).long()
        t = t.view(1, 1).expand(b, 1) if t.dim() == 0 else (t.view(b, 1) if t.dim() == 1 else t)
        if t.shape[0] != b or t.dim() != 2:
            raise ValueError(f"target must be an int, (B,) or (B, k) with B={b}; got shape {tuple(t.shape)}")
        if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f"target classes must lie in [0, {self.num_classes})")
        return t

    @torch.no_grad()
    def explain(
        self,
        inputs: torch.Tensor,
        target: Union[None, int, torch.Tensor] = None,
        topk: int = 1,
        method: Method = "pattern_attribution",
        estimator: Estimator = "positive",
    ) -> Explanation:
        """Attribute each image to its top-k classes (or ``target``): one forward, one batched reverse."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        pattern_keys(self.program, estimator)  # validates the name
        x = self._checker.images(inputs, "inputs")
        tape = Tape()
        logits = self.program.forward(x, tape=tape)
        targets = self._targets(logits, target, topk)
        k = targets.shape[1]
        lazy = self.lazy is not None and method != "gradient"
        bank, slot_of = self._lazy_bank(targets, method, estimator) if lazy else self._bank(method, estimator)
        slots = self._pair_slots(targets, slot_of, method)
        seed = torch.zeros((x.shape[0] * k, logits.shape[1]), dtype=logits.dtype, device=logits.device)
        seed.scatter_(1, targets.reshape(-1, 1), 1.0)

        def reverse(layer: AffineLayer, grad: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
            return layer.reverse(grad, bank[layer.name], slots, input_shape)

        values, exponent = self.program.backward(tape, seed, k, reverse, self.constant_gates)
        values, exponent = _denormalise(values, exponent)
        b = x.shape[0]
        return Explanation(values.view(b, k, *x.shape[1:]), targets, logits, exponent.view(b, k))

    def attribute(
        self,
        inputs: torch.Tensor,
        target: Union[None, int, torch.Tensor] = None,
        topk: int = 1,
        method: Method = "pattern_attribution",
        estimator: Estimator = "positive",
    ) -> torch.Tensor:
        """Attributions shaped like ``inputs`` (one class per image), or (B, k, ...) for several."""
        exp = self.explain(inputs, target, topk, method, estimator)
        return exp.attributions[:, 0] if exp.attributions.shape[1] == 1 else exp.attributions


class ScaledAttributionWarning(UserWarning):
    """Some maps exceed the dtype's range: they are returned normalised, with their scale exponent."""


def _denormalise(values: torch.Tensor, exponent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact maps ``values * 2**exponent`` where representable (exponent 0 there); the rest stay normalised."""
    if not bool(exponent.any()):  # the common case: no pair was ever rescaled
        return values, exponent
    exact = torch.ldexp(values, exponent.view(-1, *([1] * (values.dim() - 1))).to(values.dtype))
    amax, vmax = (t.abs().flatten(1).amax(1) if t.numel() else t.new_zeros(t.shape[0]) for t in (exact, values))
    fits = torch.isfinite(amax) & ((amax >= torch.finfo(values.dtype).tiny) | (vmax == 0))  # no overflow/underflow
    if bool(fits.all()):
        return exact, torch.zeros_like(exponent)
    warnings.warn(f"{int((~fits).sum())} of {fits.numel()} attribution maps exceed the range of {values.dtype}; "
                  "they are returned normalised (max |value| < 1) and the true map is attributions * "
                  "2**Explanation.scale_exponent. Heatmaps are unaffected (they are normalised anyway)",
                  ScaledAttributionWarning, stacklevel=3)
    _, e = torch.frexp(vmax)
    e = torch.where(fits | (vmax == 0), torch.zeros_like(exponent), e.long())
    normalised = torch.ldexp(values, (-e).view(-1, *([1] * (values.dim() - 1))).to(values.dtype))
    view = fits.view(-1, *([1] * (values.dim() - 1)))
    return torch.where(view, exact, normalised), torch.where(fits, torch.zeros_like(exponent), exponent + e)


def _stores_input_shape(stores) -> Optional[tuple[int, ...]]:
    """The one image shape all stores were estimated on (``None`` when none recorded it)."""
    shapes = {tuple(s.input_shape) for s in stores if s.input_shape is not None}
    if len(shapes) > 1:
        raise StoreError(f"the signal stores were estimated on images of different shapes {sorted(shapes)}; "
                         "use stores from one estimation run")
    return shapes.pop() if shapes else None
