"""Signal stores: one file per class with plain tensors and metadata (SPEC §4).

A store file is a ``torch.save`` of a dict of strings, numbers, lists and
tensors only; it is loaded with ``weights_only=True`` (no code runs) and
written atomically (temp file in the same directory, fsync, rename).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ._version import __version__
from .trace import Program

FORMAT = "untangle_ext.signal_store"
FORMAT_VERSION = 1
ALL_CLASSES = -1  # class id of a store estimated from every class together
PATTERN_KEYS = ("a_lin", "a_pos", "a_neg")
PathLike = Union[str, os.PathLike]


class StoreError(ValueError):
    """A store file is unusable: corrupt, of another format, or for another model."""


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
    return [{"name": l.name, "kind": l.kind, "weight_shape": list(l.weight.shape)} for l in program.layers]


@dataclass
class SignalStore:
    """Patterns of one class (or of all classes) for every affine layer of one model."""

    class_id: int
    patterns: dict[str, dict[str, torch.Tensor]]  # layer name -> a_lin / a_pos / a_neg / n_pos / n
    layers: list[dict[str, Any]]
    fingerprint: str
    num_samples: int
    estimator: dict[str, Any] = field(default_factory=lambda: {"mean_y": "all"})
    library_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            "class_id": self.class_id,
            "estimator": dict(self.estimator),
            "fingerprint": self.fingerprint,
            "num_samples": self.num_samples,
            "layers": self.layers,
            "patterns": {n: {k: v.detach().cpu() for k, v in p.items()} for n, p in self.patterns.items()},
        }

    def save(self, path: PathLike, overwrite: bool = True) -> Path:
        """Write atomically: nothing half-written is ever visible at ``path``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        atomic_torch_save(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: PathLike, map_location: Any = "cpu") -> "SignalStore":
        """Load without executing code; raises :class:`StoreError` for anything but a valid store."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"signal store {path} does not exist; estimate the signals first")
        try:
            data = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise StoreError(f"{path} is not a readable signal store ({type(exc).__name__}: {exc}); "
                             "delete it and estimate again") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StoreError(f"{path} is not an untangle_ext signal store")
        if data.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path} has store format version {data.get('format_version')!r}; this library reads "
                             f"version {FORMAT_VERSION}. Estimate the signals again with this version.")
        try:
            return cls(
                class_id=int(data["class_id"]), patterns=dict(data["patterns"]), layers=list(data["layers"]),
                fingerprint=str(data["fingerprint"]), num_samples=int(data["num_samples"]),
                estimator=dict(data["estimator"]), library_version=str(data["library_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{path} is missing or has a malformed field ({exc}); estimate again") from exc

    def check_matches(self, program: Program, fingerprint: Optional[str] = None, source: str = "store") -> None:
        """Raise :class:`StoreError` unless this store was estimated for this model."""
        if self.layers != layer_signature(program):
            raise StoreError(f"{source} was estimated for another architecture (layers "
                             f"{[l['name'] for l in self.layers]}); estimate the signals for this model")
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise StoreError(f"{source} was estimated for different model weights (fingerprint mismatch); "
                             "estimate the signals again for these weights")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def class_store_path(prefix: PathLike, class_id: int) -> Path:
    """The tutorial's file name for one class: ``f"{prefix}_class_{c}.pkl"``."""
    return Path(f"{os.fspath(prefix)}_class_{class_id}.pkl")


def load_class_stores(prefix: PathLike, classes) -> dict[int, SignalStore]:
    """Load the stores of ``classes`` written under ``prefix``."""
    return {int(c): SignalStore.load(class_store_path(prefix, c)) for c in classes}
