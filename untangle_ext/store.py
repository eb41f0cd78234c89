"""Signal stores: one file per class with plain tensors and metadata (SPEC §4).

Format v2 (written): a safetensors file (whatever its extension: the tutorial's
``{prefix}_class_{c}.pkl`` names stay, the content is told by its first bytes).
Its string metadata holds the format name, version and a JSON header (class,
estimator options, fingerprint, layers, ...); its tensors are ``{layer index}/{key}``.
By default only ``a_pos`` (what attribution uses) is kept, in float16 with one
power-of-two exponent per output neuron (``{i}/{key}/exp``, int16), so no value
overflows or underflows the half format. safetensors files are memory-mapped
and read tensor by tensor; their parser runs no code.

Format v1 (read only): a ``torch.save`` zip archive of a dict. The archive is
checked first (uncompressed entries, valid CRCs, size cap) and unpickled with
``weights_only=True``.

Either way every field is then checked against one schema, so a corrupt or
hostile file ends in a :class:`StoreError` subclass and never reaches later
code. Files are written atomically (a hidden temp file in the same directory,
fsync of the file and of the directory, rename).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ._io import atomic_write
from ._version import __version__
from .conditioning import KAPPA_KEYS, summary as _conditioning_summary
from .layers import AFFINE_KINDS
from .trace import Program

FORMAT = "untangle_ext.signal_store"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
ALL_CLASSES = -1  # class id of a store estimated from every class together
PATTERN_KEYS = ("a_lin", "a_pos", "a_neg")
COUNT_KEYS = ("n_pos", "n")
#: What a written store keeps by default: the pattern attribution uses (``estimator="positive"``).
DEFAULT_KEEP = ("a_pos",)
#: The dtype patterns are written in by default (per-neuron power-of-two scaled; map error in README).
DEFAULT_FILE_DTYPE = torch.float16
HALF_DTYPES = (torch.float16, torch.bfloat16)
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_HEADER_CHARS = 1 << 20
#: Files above this size are refused unless ``max_bytes`` is raised (VGG-16 stores are ~1.6 GB).
DEFAULT_MAX_BYTES = 8 << 30
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}
_TOP_KEYS = frozenset({"format", "format_version", "library_version", "class_id", "estimator", "fingerprint",
                       "num_samples", "input_shape", "layers", "patterns"})
_ESTIMATOR_KEYS = frozenset({"mean_y", "per_class", "store_dtype"})
_LIMIT_KEYS = frozenset({"kappa_max", "min_samples"})  # absent in stores written before issue 11
_POSITION_KEYS = frozenset({"position_rate", "position_seed"})  # only in stores of position-subsampled estimation
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


class StoreKeyError(StoreError, KeyError):
    """The store was written without a pattern the caller needs (e.g. ``a_lin`` under the default keep)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


#: Per model: (the state key it was last hashed under, its digest); see :func:`model_fingerprint`.
_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()
#: Values per tensor kept to notice writes that bypass the version counter (``p.data.copy_``, numpy views).
_SAMPLE = 64


def _state_key(model: nn.Module) -> tuple:
    """What identifies the current weights cheaply: each tensor's identity, storage, version counter and a sample."""
    key = []
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            sample = flat[::step].cpu().contiguous().view(torch.uint8).numpy().tobytes() if flat.numel() else b""
            key.append((name, id(t), t._version, t.data_ptr(), tuple(t.shape), t.dtype, str(t.device), sample))
    return tuple(key)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and values of the model's state_dict, hashed once per weight state.

    The digest is cached per model and reused while every tensor is the same object with the same
    storage, autograd version counter (bumped by in-place writes such as ``load_state_dict``) and
    sampled values, so a run that asks for every class or every call pays the hash once.
    """
    key = _state_key(model)
    cached = _FINGERPRINTS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    _FINGERPRINTS[model] = (key, h.hexdigest())
    return _FINGERPRINTS[model][1]


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
        """One line: class, layers, samples, estimator, conditioning and file; never the patterns themselves."""
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        shape = f", input_shape={list(self.input_shape)}" if self.input_shape is not None else ""
        return (f"SignalStore(class_id={self.class_id}, layers={len(self.layers)}, num_samples={self.num_samples}, "
                f"mean_y={self.estimator.get('mean_y')!r}{shape}, fingerprint={self.fingerprint[:12]!r}{where}; "
                f"{self.summary()})")

    def summary(self) -> str:
        """One line on the conditioning of the a⁺ patterns: neurons, dead, ill-conditioned, largest κ."""
        return _conditioning_summary(self)

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data and CPU tensors (the v1 file's content; v2 files hold the same fields)."""
        return {
            "format": FORMAT,
            "format_version": 1,
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

    def encoded(self, dtype: torch.dtype = DEFAULT_FILE_DTYPE, keep: Sequence[str] = DEFAULT_KEEP) -> "SignalStore":
        """This store as a file written with ``dtype`` and ``keep`` reads back (patterns rounded, others dropped)."""
        keep = _check_keep(keep)
        missing = [k for k in keep if any(k not in p for p in self.patterns.values())]
        if missing:
            raise KeyError(f"{self.source} has no {missing} patterns to keep (it holds "
                           f"{sorted(next(iter(self.patterns.values())))})")
        patterns = {n: {k: (_decode(*_encode(v, dtype)) if k in PATTERN_KEYS else v)
                        for k, v in p.items() if k in keep or k not in PATTERN_KEYS}
                    for n, p in self.patterns.items()}
        estimator = {**self.estimator, "store_dtype": str(dtype)[6:]}
        return SignalStore(self.class_id, patterns, self.layers, self.fingerprint, self.num_samples, estimator,
                           self.library_version, self.input_shape)

    def save(self, path: PathLike, overwrite: bool = True, dtype: torch.dtype = DEFAULT_FILE_DTYPE,
             keep: Sequence[str] = DEFAULT_KEEP) -> Path:
        """Validate, then write a v2 file atomically: nothing half-written is ever visible at ``path``.

        ``keep``: the patterns to write (default only ``a_pos``; ``PATTERN_KEYS`` keeps all three);
        ``dtype``: their storage dtype (float16/bfloat16 with per-neuron power-of-two exponents, or
        float32/float64 as they are). ``self.encoded(dtype, keep)`` is exactly what loading gives back.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        if dtype not in STORE_DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(STORE_DTYPES)}, not {dtype}")
        keep = _check_keep(keep)
        data = self.to_dict()
        data["format_version"] = FORMAT_VERSION
        data["estimator"]["store_dtype"] = str(dtype)[6:]
        data["patterns"] = {n: {k: v for k, v in p.items() if k in keep or k not in PATTERN_KEYS}
                            for n, p in data["patterns"].items()}
        _validate(data, f"the store to be written to {path}")
        atomic_write(path, lambda f: _write_v2(f, data, dtype))
        self.path = path
        return path

    @classmethod
    def load(cls, path: PathLike, map_location: Any = "cpu", expected_class: Optional[int] = None,
             max_bytes: Optional[int] = DEFAULT_MAX_BYTES, keys: Optional[Sequence[str]] = None) -> "SignalStore":
        """Load and validate without executing code (v2 safetensors or v1 torch archives).

        ``keys``: the patterns to read (default: all the file holds); a v2 file reads only
        those from disk. Raises a :class:`StoreError` subclass for anything but a valid store:
        :class:`StoreMissingError`, :class:`StoreTooLargeError`, :class:`StoreCorruptError`
        (:class:`StoreUnsafeError` for pickle payloads), :class:`StoreVersionError`, and
        :class:`StoreClassMismatchError` when ``expected_class`` is given and differs.
        """
        path = Path(path)
        wanted = None if keys is None else _check_keep(keys)
        data = _read(path, max_bytes, wanted)
        _validate(data, str(path))
        patterns = {n: {k: v.to(map_location) for k, v in p.items() if wanted is None or k in wanted
                        or k not in PATTERN_KEYS} for n, p in data["patterns"].items()}
        store = cls(
            class_id=data["class_id"], layers=data["layers"], fingerprint=data["fingerprint"],
            num_samples=data["num_samples"], estimator=data["estimator"], library_version=data["library_version"],
            input_shape=data["input_shape"], path=path, patterns=patterns)
        if wanted is not None:
            store.check_keys(wanted)
        if expected_class is not None:
            store.check_class(expected_class)
        return store

    def check_keys(self, keys: Sequence[str]) -> None:
        """Raise :class:`StoreKeyError` unless every layer holds the patterns ``keys``."""
        held = set.intersection(*(set(p) for p in self.patterns.values()))
        missing = [k for k in keys if k not in held]
        if missing:
            raise StoreKeyError(
                f"{self.source} holds no {missing} patterns (written with keep={sorted(held & set(PATTERN_KEYS))}); "
                f"use estimator='positive' (a_pos), or estimate again and save with keep={tuple(PATTERN_KEYS)}")

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


def _read(path: Path, max_bytes: Optional[int], keys: Optional[tuple[str, ...]] = None) -> Any:
    """The store dict of ``path`` (v1 or v2, told by the first bytes) after the file-level checks."""
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
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == _ZIP_MAGIC:
        data = _read_v1(path, size)
        _check_format(data, path, 1)
        return data
    if len(head) == 9 and head[8:9] == b"{":
        return _read_v2(path, keys)
    raise StoreCorruptError(f"{path} is not a readable signal store (neither a safetensors file nor a torch "
                            f"archive: truncated, overwritten or not a store); {_REDO}")


def _read_v1(path: Path, size: int) -> Any:
    """The unpickled content of a v1 (torch zip) store after the archive-level checks."""
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


_TENSOR_NAME = re.compile(r"(\d{1,6})/([a-z_]{1,16})(/exp)?")


def _read_v2(path: Path, keys: Optional[tuple[str, ...]]) -> dict[str, Any]:
    """A v2 (safetensors) store as the same dict a v1 file holds; only the pattern ``keys`` are read."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            if meta.get("format") != FORMAT:
                raise StoreCorruptError(f"{path} is a safetensors file but not an untangle_ext signal store; pass "
                                        "the path of a store written by SignalStore.save / fit_to_files")
            header = meta.get("header")
            if type(header) is not str or len(header) > _MAX_HEADER_CHARS:
                raise StoreCorruptError(f"{path}: the store header is missing or too long; {_REDO}")
            data = _json_or_none(header)
            writer = data.get("library_version") if type(data) is dict else None
            _check_format({"format": FORMAT, "format_version": _int_or_text(meta.get("format_version")),
                           "library_version": writer}, path, 2)
            if type(data) is not dict:
                raise StoreCorruptError(f"{path}: the store header is not a JSON object; {_REDO}")
            held = {m.group(2) for m in map(_TENSOR_NAME.fullmatch, names) if m and m.group(2) in PATTERN_KEYS}
            if keys is not None and not set(keys) <= held:
                raise StoreKeyError(f"{path} holds no {sorted(set(keys) - held)} patterns (written with keep="
                                    f"{sorted(held)}); use estimator='positive' (a_pos), or estimate again and "
                                    f"save with keep={tuple(PATTERN_KEYS)}")
            wanted = [n for n in names if _wanted(n, keys)]
            tensors = {n: f.get_tensor(n) for n in wanted}
    except StoreError:
        raise
    except Exception as exc:  # safetensors, json (RecursionError on deep nesting), OS errors
        raise _corrupt(path, exc) from None
    data.update(format=FORMAT, format_version=FORMAT_VERSION, patterns=_assemble(tensors, data, str(path)))
    return data


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _int_or_text(v: Any) -> Any:
    return int(v) if type(v) is str and v.isdigit() and len(v) < 10 else v


def _wanted(name: str, keys: Optional[tuple[str, ...]]) -> bool:
    m = _TENSOR_NAME.fullmatch(name)
    return keys is None or m is None or m.group(2) in keys or m.group(2) not in PATTERN_KEYS


def _assemble(tensors: dict[str, torch.Tensor], header: dict[str, Any], source: str) -> dict[str, dict]:
    """Per-layer tensor dicts from ``{i}/{key}[/exp]`` names, half patterns decoded with their exponents."""
    chk = _Checker(source)
    layers = header.get("layers")
    if type(layers) is not list or any(type(l) is not dict or type(l.get("name")) is not str for l in layers):
        raise chk.fail("layers", "must be a list of layers with names")
    out: dict[str, dict[str, Any]] = {l["name"]: {} for l in layers}
    exps = {}
    for name, t in tensors.items():
        m = _TENSOR_NAME.fullmatch(name)
        if m is None or int(m.group(1)) >= len(layers):
            raise chk.fail(f"tensor {name[:40]!r}", "is not a pattern of a listed layer")
        target = exps if m.group(3) else out[layers[int(m.group(1))]["name"]]
        target[(int(m.group(1)), m.group(2)) if m.group(3) else m.group(2)] = t
    for (i, key), e in exps.items():
        p = out[layers[i]["name"]]
        q = p.get(key)
        if q is None or q.dtype not in HALF_DTYPES or e.dtype != torch.int16 or list(e.shape) != list(q.shape[:1]):
            raise chk.fail(f"{i}/{key}/exp", "must be the int16 per-neuron exponents of a half-precision pattern")
        p[key] = _decode(q, e)
    for i, l in enumerate(layers):
        for key, q in out[l["name"]].items():
            if q.dtype in HALF_DTYPES and (i, key) not in exps:
                raise chk.fail(f"{i}/{key}", "is half precision without its exponents")
    return out


def _encode(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``t`` in ``dtype``; half dtypes as (values scaled into [-1, 1] per neuron, int16 power-of-two exponents)."""
    if dtype not in HALF_DTYPES:
        return t.to(dtype), None
    rows = t.detach().double().reshape(t.shape[0], -1)
    exp = torch.frexp(rows.abs().amax(1)).exponent.to(torch.int16)
    scaled = torch.ldexp(rows, -exp.view(-1, 1).double())
    return scaled.to(dtype).reshape(t.shape).contiguous(), exp


def _decode(q: torch.Tensor, exp: Optional[torch.Tensor]) -> torch.Tensor:
    """The float32 pattern of an encoded half tensor (exact: a power-of-two scaling); others as they are."""
    if exp is None:
        return q
    return torch.ldexp(q.float(), exp.view(-1, *([1] * (q.dim() - 1))).float())


def v2_bytes(data: dict[str, Any], dtype: torch.dtype) -> bytes:
    """The safetensors bytes of a store dict (patterns encoded in ``dtype``); no validation: callers validate."""
    names = [l["name"] for l in data["layers"]]
    tensors = {}
    for i, name in enumerate(names):
        for key, t in data["patterns"][name].items():
            q, exp = _encode(t, dtype) if key in PATTERN_KEYS else (t, None)
            tensors[f"{i}/{key}"] = q.contiguous()
            if exp is not None:
                tensors[f"{i}/{key}/exp"] = exp
    header = {k: v for k, v in data.items() if k not in ("format", "format_version", "patterns")}
    meta = {"format": FORMAT, "format_version": str(data["format_version"]), "header": json.dumps(header)}
    return safetensors_bytes(tensors, metadata=meta)


def _write_v2(f: Any, data: dict[str, Any], dtype: torch.dtype) -> None:
    f.write(v2_bytes(data, dtype))


def _check_keep(keep: Sequence[str]) -> tuple[str, ...]:
    keep = (keep,) if isinstance(keep, str) else tuple(keep)
    if not keep or any(k not in PATTERN_KEYS for k in keep):
        raise ValueError(f"keep must be a non-empty subset of {PATTERN_KEYS}, not {keep!r}")
    return keep


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


def _check_format(data: Any, path: Path, container: int) -> None:
    """The file is one of ours, in a version this library reads from this container (v1 zip, v2 safetensors)."""
    if type(data) is not dict or data.get("format") != FORMAT:
        raise StoreCorruptError(f"{path} is a torch file but not an untangle_ext signal store; pass the path of a "
                                "store written by SignalStore.save / fit_to_files, or estimate the signals")
    version = data.get("format_version")
    if type(version) is not int:
        raise StoreCorruptError(f"{path}: field format_version must be an int, not {_describe(version)}; {_REDO}")
    if version > FORMAT_VERSION:
        writer = data.get("library_version")
        writer = writer[:40] if type(writer) is str else "an unknown version"
        raise StoreVersionError(f"{path} uses store format version {version} (written by untangle_ext {writer}); "
                                f"this untangle_ext {__version__} reads versions {READ_VERSIONS}: upgrade "
                                "untangle_ext to read it, or estimate the signals again with this version")
    if version != container:
        raise StoreCorruptError(f"{path}: format version {version} in a version-{container} container; {_REDO}")


def _validate(data: Any, source: str) -> None:
    """Check every field of a store dict; ``data`` may come from an untrusted file."""
    chk = _Checker(source)
    chk.keys(data, "<top level>", _TOP_KEYS)
    if data["format"] != FORMAT or data["format_version"] not in READ_VERSIONS:
        raise chk.fail("format/format_version", f"must be {FORMAT!r} version {READ_VERSIONS}")
    chk.str_(data["library_version"], "library_version", 64)
    fingerprint = chk.str_(data["fingerprint"], "fingerprint", 64)
    if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise chk.fail("fingerprint", "must be 64 lowercase hex digits (a sha256)")
    chk.int_(data["num_samples"], "num_samples", 1)
    if data["input_shape"] is not None:
        chk.shape(data["input_shape"], "input_shape", range(1, 9))
    estimator = chk.keys(data["estimator"], "estimator", _ESTIMATOR_KEYS, _LIMIT_KEYS | _POSITION_KEYS)
    _validate_limits(chk, estimator)
    _validate_positions(chk, estimator)
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


def _validate_positions(chk: _Checker, estimator: dict) -> None:
    """Position subsampling (both or neither): a rate in (0, 1) and an int seed."""
    if not estimator.keys() & _POSITION_KEYS:
        return
    rate, seed = estimator.get("position_rate"), estimator.get("position_seed")
    if type(rate) is not float or not 0.0 < rate < 1.0:
        raise chk.fail("estimator.position_rate", f"must be a float in (0, 1), not {_describe(rate)}")
    if type(seed) is not int:
        raise chk.fail("estimator.position_seed", f"must be an int, not {_describe(seed)}")


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
    """Per layer: the counts, and a non-empty subset of :data:`PATTERN_KEYS` shaped like the weight."""
    chk.keys(patterns, "patterns", [l["name"] for l in layers])
    held = None
    for layer in layers:
        name, shape = layer["name"], layer["weight_shape"]
        where = f"patterns[{name[:40]!r}]"
        p = patterns[name]
        if type(p) is not dict:
            raise chk.fail(where, f"must be a dict, not {_describe(p)}")
        keys = frozenset(k for k in p if k in PATTERN_KEYS)
        if not keys or held not in (None, keys):
            raise chk.fail(where, f"must hold the same non-empty subset of {list(PATTERN_KEYS)} in every layer")
        held = keys
        chk.keys(p, where, keys | set(COUNT_KEYS), KAPPA_KEYS)
        for key in KAPPA_KEYS:
            if key in p:
                p[key] = chk.tensor(p[key], f"{where}.{key}", shape[:1], (torch.float32,))
                if bool((p[key] < 0).any()):
                    raise chk.fail(f"{where}.{key}", "must be >= 0 (κ = |a|·|w|)")
        for key in keys:
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
