"""The engine's hot operations; the only module that knows which backend runs them.

Everything above this layer calls ``ops.*`` and never branches on the backend.
``backend()`` says which implementation is active and why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import _reference

_ENV = "UNTANGLE_EXT_BACKEND"


@dataclass(frozen=True)
class BackendInfo:
    """Which implementation runs the ops, and why it was chosen."""

    name: str
    reason: str


def _select() -> BackendInfo:
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced not in ("", "torch", "native"):
        raise ValueError(f"{_ENV}={forced!r} is not understood; use 'torch' or 'native' (or unset it)")
    if forced == "native":
        raise RuntimeError(
            f"{_ENV}=native was requested, but this build of untangle_ext has no native extension; "
            "unset the variable to use the PyTorch backend"
        )
    reason = f"forced by {_ENV}=torch" if forced == "torch" else "no native extension in this build"
    return BackendInfo("torch", reason)


_BACKEND = _select()


def backend() -> BackendInfo:
    """Report the active backend (``name`` is 'torch' or 'native') and why it is active."""
    return _BACKEND


accumulate_linear = _reference.accumulate_linear
accumulate_conv2d = _reference.accumulate_conv2d
pattern_backward_linear = _reference.pattern_backward_linear
pattern_backward_conv2d = _reference.pattern_backward_conv2d
