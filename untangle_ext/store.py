"""Signal stores: one file per class with plain tensors and metadata (SPEC §4).

A store file is a ``torch.save`` zip archive of a dict of strings, numbers,
lists and dense CPU tensors. Loading never executes code: the archive is
checked first (uncompressed entries, valid CRCs, size cap), unpickled with
``weights_only=True``, and then every field is checked against the schema
below, so a corrupt or hostile file ends in a :class:`StoreError` subclass and
never reaches later code. Files are written atomically (a hidden temp file in
the same directory, fsync of the file and of the directory, rename).
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn as nn

from ._io import atomic_write
from ._version import __version__
from .conditioning import KAPPA_KEYS, summary as _conditioning_summary
from .layers import AFFINE_KINDS
from .trace import Program

FORMAT = "untangle_ext.signal_store"
FORMAT_VERSION = 1
ALL_CLASSES = -1  # class id of a store estimated from every class together
PATTERN_KEYS = ("a_lin", "a_pos", "a_neg")
COUNT_KEYS = ("n_pos", "n")
#: Files above this size are refused unless ``max_bytes`` is raised (VGG-16 stores are ~1.6 GB).
DEFAULT_MAX_BYTES = 8 << 30
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}
_TOP_KEYS = frozenset({"format", "format_version", "library_version", "class_id", "estimator", "fingerprint",
                       "num_samples", "input_shape", "layers", "patterns"})
_ESTIMATOR_KEYS = frozenset({"mean_y", "per_class", "store_dtype"})
_LIMIT_KEYS = frozenset({"kappa_max", "min_samples"})  # absent in stores written before issue 11
_LAYER_KEYS = frozenset({"name", "kind", "weight_shape"})
_REDO = "delete it and estimate the signals again"
PathLike = Union[str, os.PathLike]


class StoreError(ValueError):
    """A store file is unusable: corrupt, of another format, or for another model."""


class StoreMissingError(StoreError, FileNotFoundError):
    """The store file does not exist (the class was never estimated)."""


class StoreCorruptError(StoreError):
    """Not a readable signal store: truncated, random bytes, or a field with a wrong type/shape/value."""


class StoreUnsafeError(StoreCorruptError):
    """The file references Python objects a store never holds (a pickle payload); nothing was executed."""


class StoreTooLargeError(StoreError):
    """The file is larger than the ``max_bytes`` cap of :meth:`SignalStore.load`."""


class StoreVersionError(StoreError):
    """The file uses a store format version this library does not read."""


class StoreModelMismatchError(StoreError):
    """The store was estimated for another model."""


class StoreArchitectureError(StoreModelMismatchError):
    """The store's layers (names, kinds, weight shapes) differ from the model's."""


class StoreWeightsError(StoreModelMismatchError):
    """Same architecture, but the model's weights changed since the store was estimated."""


class StoreClassMismatchError(StoreError):
    """The store holds another class than the one its file name (or mapping key) says."""


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and values of the model's state_dict."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def layer_signature(program: Program) -> list[dict[str, Any]]:
    """The affine layers a store must match: names, kinds and weight shapes, in order."""
    return [layer.signature() for layer in program.layers]


@dataclass
class SignalStore:
    """Patterns of one class (or of all classes) for every affine layer of one model."""

    class_id: int
    patterns: dict[str, dict[str, torch.Tensor]]  # layer name -> a_lin / a_pos / a_neg / n_pos / n
    layers: list[dict[str, Any]]
    fingerprint: str
    num_samples: int
    estimator: dict[str, Any] = field(
        default_factory=lambda: {"mean_y": "all", "per_class": True, "store_dtype": "float32"})
    library_version: str = __version__
    input_shape: Optional[list[int]] = None  # shape of one image seen in estimation, e.g. [1, 28, 28]
    path: Optional[Path] = field(default=None, compare=False)  # where it was loaded from / saved to

    def __repr__(self) -> str:
        return f"SignalStore(class {self.class_id}, {self.num_samples} images: {self.summary()})"

    def summary(self) -> str:
        """One line on the conditioning of the a⁺ patterns: neurons, dead, ill-conditioned, largest κ."""
        return _conditioning_summary(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            "class_id": self.class_id,
            "estimator": dict(self.estimator),
            "fingerprint": self.fingerprint,
            "num_samples": self.num_samples,
            "input_shape": None if self.input_shape is None else [int(s) for s in self.input_shape],
            "layers": [dict(l) for l in self.layers],
            "patterns": {n: {k: v.detach().cpu().contiguous() for k, v in p.items()}
                         for n, p in self.patterns.items()},
        }

    @property
    def source(self) -> str:
        """How messages name this store: its file, or 'the in-memory store of class c'."""
        return str(self.path) if self.path is not None else f"the in-memory signal store of class {self.class_id}"

    def save(self, path: PathLike, overwrite: bool = True) -> Path:
        """Validate, then write atomically: nothing half-written is ever visible at ``path``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        data = self.to_dict()
        _validate(data, f"the store to be written to {path}")
        atomic_torch_save(data, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: PathLike, map_location: Any = "cpu", expected_class: Optional[int] = None,
             max_bytes: Optional[int] = DEFAULT_MAX_BYTES) -> "SignalStore":
        """Load and validate without executing code.

        Raises a :class:`StoreError` subclass for anything but a valid store:
        :class:`StoreMissingError`, :class:`StoreTooLargeError`, :class:`StoreCorruptError`
        (:class:`StoreUnsafeError` for pickle payloads), :class:`StoreVersionError`, and
        :class:`StoreClassMismatchError` when ``expected_class`` is given and differs.
        """
        path = Path(path)
        data = _read(path, max_bytes)
        _check_format(data, path)
        _validate(data, str(path))
        store = cls(
            class_id=data["class_id"], layers=data["layers"], fingerprint=data["fingerprint"],
            num_samples=data["num_samples"], estimator=data["estimator"], library_version=data["library_version"],
            input_shape=data["input_shape"], path=path,
            patterns={n: {k: v.to(map_location) for k, v in p.items()} for n, p in data["patterns"].items()},
        )
        if expected_class is not None:
            store.check_class(expected_class)
        return store

    def check_class(self, expected_class: int) -> None:
        """Raise :class:`StoreClassMismatchError` unless this store holds ``expected_class``."""
        if self.class_id != int(expected_class):
            raise StoreClassMismatchError(
                f"{self.source} holds the patterns of class {self.class_id}, not of class {expected_class} as its "
                f"name says (a file renamed or copied from another class, or another class set); {_REDO} for "
                f"class {expected_class} (e.g. fit_to_files(..., overwrite=True))")

    def check_matches(self, program: Program, fingerprint: Optional[str] = None,
                      source: Optional[str] = None) -> None:
        """Raise :class:`StoreArchitectureError` / :class:`StoreWeightsError` unless estimated for this model."""
        source = source or self.source
        expected = layer_signature(program)
        if self.layers != expected:
            raise StoreArchitectureError(
                f"{source} was estimated for another architecture: {_first_difference(self.layers, expected)}. "
                "Load the model the store was made for, or estimate the signals for this model")
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise StoreWeightsError(
                f"{source} was estimated for different model weights (same architecture; model fingerprint "
                f"{fingerprint[:12]}…, store {self.fingerprint[:12]}…): the model was retrained or another "
                "checkpoint was loaded. Load the checkpoint the store was made for, or estimate the signals again")


def _first_difference(have: list[dict[str, Any]], want: list[dict[str, Any]]) -> str:
    """A short description of where two layer signatures part ways."""
    for i, (h, w) in enumerate(zip(have, want)):
        if h != w:
            return (f"layer {i} is {h['kind']} '{h['name']}' {h['weight_shape']} in the store but "
                    f"{w['kind']} '{w['name']}' {w['weight_shape']} in the model")
    return f"the store has {len(have)} Linear/Conv layers, the model {len(want)}"


# ----------------------------------------------------------------------------------------------------------
# Reading: archive checks, then a weights-only unpickle


def _read(path: Path, max_bytes: Optional[int]) -> Any:
    """The unpickled content of ``path`` after the archive-level checks."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise StoreMissingError(f"signal store {path} does not exist; estimate the signals for this class first "
                                "(SignalEstimator.fit_to_files / UntangleAI.estimate_signals)") from None
    if not path.is_file():
        raise StoreCorruptError(f"{path} is not a regular file; pass the path of a signal store file")
    if max_bytes is not None and size > max_bytes:
        raise StoreTooLargeError(f"{path} is {size} bytes, above the cap max_bytes={max_bytes}; if you trust the "
                                 "file and its size is expected, load it with a larger max_bytes (or None)")
    _check_archive(path, size)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported" in str(exc) or "allowlisted" in str(exc) or "allowed global" in str(exc):
            raise StoreUnsafeError(
                f"{path} references Python objects that a signal store never contains "
                f"({_unsafe_detail(str(exc))}); it was NOT executed. Do not open it with pickle or "
                f"torch.load(weights_only=False); {_REDO}, or get the file from a trusted source") from None
        raise _corrupt(path, exc) from None
    except Exception as exc:  # torch/miniz raise many kinds of errors on damaged archives
        raise _corrupt(path, exc) from None


def _check_archive(path: Path, size: int) -> None:
    """A torch zip archive with stored (uncompressed) entries, sane sizes and valid CRCs."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if any(i.compress_type != zipfile.ZIP_STORED or i.file_size > size for i in infos):
                raise StoreCorruptError(f"{path} has compressed or oversized archive entries, which this library "
                                        f"never writes; {_REDO}")
            if not any(i.filename.endswith("/data.pkl") or i.filename == "data.pkl" for i in infos):
                raise StoreCorruptError(f"{path} is a zip archive but not a torch.save file; {_REDO}")
            bad = zf.testzip()
    except StoreError:
        raise
    except Exception as exc:  # zipfile raises BadZipFile, EOFError, ValueError, OSError, ...
        raise _corrupt(path, exc) from None
    if bad is not None:
        raise StoreCorruptError(f"{path} is damaged (checksum mismatch in entry {bad[:80]!r}); {_REDO}")


def _corrupt(path: Path, exc: BaseException) -> StoreCorruptError:
    detail = str(exc).splitlines()[0][:160] if str(exc) else ""
    return StoreCorruptError(f"{path} is not a readable signal store (truncated, overwritten or not a store: "
                             f"{type(exc).__name__}{': ' + detail if detail else ''}); {_REDO}")


def _unsafe_detail(message: str) -> str:
    found = re.search(r"GLOBAL [\w.]+", message) or re.search(r"Unsupported [\w ]+", message)
    return found.group(0)[:120] if found else "an object that is not a tensor or plain data"


# ----------------------------------------------------------------------------------------------------------
# Validation: every field's type, shape, dtype and value; never repr untrusted containers


def _describe(v: Any) -> str:
    """A short, safe description of an untrusted value (no repr of containers)."""
    if isinstance(v, (bool, int, float)) and not isinstance(v, torch.Tensor):
        return f"{type(v).__name__} {str(v)[:40]}"
    if isinstance(v, str):
        return f"str {v[:40]!r}"
    if isinstance(v, torch.Tensor):
        return f"tensor {tuple(v.shape)} {v.dtype}"
    return type(v).__name__


class _Checker:
    """Field checks of one file; each failure is a :class:`StoreCorruptError` naming the file and field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, what: str) -> StoreCorruptError:
        return StoreCorruptError(f"{self.source}: field {where} {what}; the file is damaged or was edited; {_REDO}")

    def int_(self, v: Any, where: str, lo: int) -> int:
        if type(v) is not int or v < lo:
            raise self.fail(where, f"must be an int >= {lo}, not {_describe(v)}")
        return v

    def str_(self, v: Any, where: str, max_len: int = 256) -> str:
        if type(v) is not str or len(v) > max_len:
            raise self.fail(where, f"must be text of at most {max_len} characters, not {_describe(v)}")
        return v

    def keys(self, v: Any, where: str, keys: Iterable[str], optional: Iterable[str] = ()) -> dict:
        keys, optional = frozenset(keys), frozenset(optional)
        if type(v) is not dict:
            raise self.fail(where, f"must be a dict, not {_describe(v)}")
        if not keys <= set(v) <= keys | optional:
            extra = f" (optionally also {sorted(optional)})" if optional else ""
            raise self.fail(where, f"must have exactly the keys {sorted(keys)}{extra}")
        return v

    def shape(self, v: Any, where: str, ndims: Iterable[int]) -> list[int]:
        ndims = tuple(ndims)
        if type(v) is not list or len(v) not in ndims:
            raise self.fail(where, f"must be a list of {' or '.join(map(str, ndims))} ints, not {_describe(v)}")
        return [self.int_(s, f"{where}[{i}]", 1) for i, s in enumerate(v)]

    def tensor(self, v: Any, where: str, shape: list[int], dtypes: Iterable[torch.dtype]) -> torch.Tensor:
        """A dense, contiguous, finite CPU tensor of ``shape`` with one of ``dtypes``."""
        dtypes = tuple(dtypes)
        if type(v) not in (torch.Tensor, nn.Parameter):
            raise self.fail(where, f"must be a tensor, not {_describe(v)}")
        if v.layout != torch.strided or v.is_quantized or v.device.type != "cpu" or v.is_complex():
            raise self.fail(where, "must be a dense real CPU tensor")
        if list(v.shape) != shape or v.dtype not in dtypes:
            raise self.fail(where, f"must be a {shape} tensor of {' or '.join(map(str, dtypes))}, "
                                   f"not {_describe(v)}")
        # contiguity and storage size before touching values: a stride-0 view could claim any size
        if not v.is_contiguous() or v.untyped_storage().nbytes() < (v.storage_offset() + v.numel()) * v.element_size():
            raise self.fail(where, "must be a contiguous tensor backed by its own data")
        if v.numel() and not bool(torch.isfinite(v).all()):
            raise self.fail(where, "contains NaN or Inf")
        return v.detach()


def _check_format(data: Any, path: Path) -> None:
    """The file is one of ours, in a version this library reads."""
    if type(data) is not dict or data.get("format") != FORMAT:
        raise StoreCorruptError(f"{path} is a torch file but not an untangle_ext signal store; pass the path of a "
                                "store written by SignalStore.save / fit_to_files, or estimate the signals")
    version = data.get("format_version")
    if type(version) is not int:
        raise StoreCorruptError(f"{path}: field format_version must be an int, not {_describe(version)}; {_REDO}")
    if version != FORMAT_VERSION:
        writer = data.get("library_version")
        writer = writer[:40] if type(writer) is str else "an unknown version"
        fix = ("upgrade untangle_ext to read it, or estimate the signals again with this version"
               if version > FORMAT_VERSION else "estimate the signals again with this version")
        raise StoreVersionError(f"{path} uses store format version {version} (written by untangle_ext {writer}); "
                                f"this untangle_ext {__version__} reads version {FORMAT_VERSION}: {fix}")


def _validate(data: Any, source: str) -> None:
    """Check every field of a store dict; ``data`` may come from an untrusted file."""
    chk = _Checker(source)
    chk.keys(data, "<top level>", _TOP_KEYS)
    if data["format"] != FORMAT or data["format_version"] != FORMAT_VERSION:
        raise chk.fail("format/format_version", f"must be {FORMAT!r} version {FORMAT_VERSION}")
    chk.str_(data["library_version"], "library_version", 64)
    fingerprint = chk.str_(data["fingerprint"], "fingerprint", 64)
    if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise chk.fail("fingerprint", "must be 64 lowercase hex digits (a sha256)")
    chk.int_(data["num_samples"], "num_samples", 1)
    if data["input_shape"] is not None:
        chk.shape(data["input_shape"], "input_shape", range(1, 9))
    estimator = chk.keys(data["estimator"], "estimator", _ESTIMATOR_KEYS, _LIMIT_KEYS)
    _validate_limits(chk, estimator)
    if type(estimator["mean_y"]) is not str or estimator["mean_y"] not in ("all", "positive"):
        raise chk.fail("estimator.mean_y", f"must be 'all' or 'positive', not {_describe(estimator['mean_y'])}")
    if type(estimator["per_class"]) is not bool:
        raise chk.fail("estimator.per_class", f"must be a bool, not {_describe(estimator['per_class'])}")
    if type(estimator["store_dtype"]) is not str or estimator["store_dtype"] not in STORE_DTYPES:
        raise chk.fail("estimator.store_dtype", f"must be one of {sorted(STORE_DTYPES)}")
    layers = _validate_layers(chk, data["layers"])
    class_id = chk.int_(data["class_id"], "class_id", ALL_CLASSES)
    num_classes = layers[-1]["weight_shape"][0]
    if class_id >= num_classes or (class_id == ALL_CLASSES) == estimator["per_class"]:
        raise chk.fail("class_id", f"{class_id} does not fit a model with {num_classes} outputs and "
                                   f"per_class={estimator['per_class']}")
    _validate_patterns(chk, data["patterns"], layers)


def _validate_limits(chk: _Checker, estimator: dict) -> None:
    """The conditioning limits (both or neither): kappa_max a float >= 1, min_samples an int >= 1."""
    if not estimator.keys() & _LIMIT_KEYS:
        return
    if not _LIMIT_KEYS <= estimator.keys():
        raise chk.fail("estimator", f"must have both or none of {sorted(_LIMIT_KEYS)}")
    kmax = estimator["kappa_max"]
    if type(kmax) is not float or not math.isfinite(kmax) or kmax < 1:
        raise chk.fail("estimator.kappa_max", f"must be a finite float >= 1, not {_describe(kmax)}")
    chk.int_(estimator["min_samples"], "estimator.min_samples", 1)


def _validate_layers(chk: _Checker, layers: Any) -> list[dict[str, Any]]:
    if type(layers) is not list or not layers:
        raise chk.fail("layers", f"must be a non-empty list, not {_describe(layers)}")
    names = set()
    for i, layer in enumerate(layers):
        where = f"layers[{i}]"
        chk.keys(layer, where, _LAYER_KEYS)
        name = chk.str_(layer["name"], f"{where}.name")
        if name in names:
            raise chk.fail(f"{where}.name", f"repeats the layer name {name[:40]!r}")
        names.add(name)
        if type(layer["kind"]) is not str or layer["kind"] not in AFFINE_KINDS:
            raise chk.fail(f"{where}.kind", f"must be one of {sorted(AFFINE_KINDS)}, not {_describe(layer['kind'])}")
        chk.shape(layer["weight_shape"], f"{where}.weight_shape", (AFFINE_KINDS[layer["kind"]].weight_rank,))
    return layers


def _validate_patterns(chk: _Checker, patterns: Any, layers: list[dict[str, Any]]) -> None:
    chk.keys(patterns, "patterns", [l["name"] for l in layers])
    for layer in layers:
        name, shape = layer["name"], layer["weight_shape"]
        where = f"patterns[{name[:40]!r}]"
        p = chk.keys(patterns[name], where, PATTERN_KEYS + COUNT_KEYS, KAPPA_KEYS)
        for key in KAPPA_KEYS:
            if key in p:
                p[key] = chk.tensor(p[key], f"{where}.{key}", shape[:1], (torch.float32,))
                if bool((p[key] < 0).any()):
                    raise chk.fail(f"{where}.{key}", "must be >= 0 (κ = |a|·|w|)")
        for key in PATTERN_KEYS:
            p[key] = chk.tensor(p[key], f"{where}.{key}", shape, STORE_DTYPES.values())
        n_pos = chk.tensor(p["n_pos"], f"{where}.n_pos", shape[:1], (torch.float64,))
        n = chk.tensor(p["n"], f"{where}.n", [], (torch.float64,))
        p["n_pos"], p["n"] = n_pos, n
        counts = torch.cat([n_pos, n.view(1)])
        if bool((counts < 0).any()) or bool((counts != counts.round()).any()) or bool((n_pos > n).any()):
            raise chk.fail(f"{where}.n_pos/n", "must be whole counts with 0 <= n_pos <= n")
        if float(n) >= math.ldexp(1.0, 53):
            raise chk.fail(f"{where}.n", "is too large to be a sample count")


# ----------------------------------------------------------------------------------------------------------
# Writing


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` through :func:`untangle_ext._io.atomic_write` (temp file, fsync, rename)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def class_store_path(prefix: PathLike, class_id: int) -> Path:
    """The tutorial's file name for one class: ``f"{prefix}_class_{c}.pkl"``."""
    return Path(f"{os.fspath(prefix)}_class_{class_id}.pkl")


def load_class_stores(prefix: PathLike, classes: Iterable[int]) -> dict[int, SignalStore]:
    """Load the stores of ``classes`` written under ``prefix``, checking each holds the class its name says."""
    return {int(c): SignalStore.load(class_store_path(prefix, c), expected_class=int(c)) for c in classes}
