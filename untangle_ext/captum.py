"""Captum and Quantus interop: our methods as ``captum.attr.Attribution`` classes and a Quantus ``explain_func``.

Captum (``pip install untangle-ext[ecosystem]``) is needed for the classes, not for :func:`quantus_explain`::

    from untangle_ext.captum import PatternAttribution
    pa = PatternAttribution(model, stores)
    attr = pa.attribute(images, target=labels)            # shaped like images, like any Captum method
    captum.attr.visualization.visualize_image_attr(...)   # and captum.metrics.infidelity / sensitivity_max

``target=None`` explains each image's predicted class (Captum's gradient methods would need a
scalar output instead). The attributions carry no autograd history, and there is no convergence delta.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from .attribution import Attributor, Method
from .store import SignalStore

try:
    from captum.attr import Attribution as _CaptumAttribution
except ImportError as _exc:  # the Quantus explain_func below still works
    _CaptumAttribution = None
    _CAPTUM_ERROR = _exc

Stores = Union[SignalStore, Mapping[int, SignalStore], None]
Target = Union[None, int, list, tuple, torch.Tensor]


def _require_captum() -> type:
    """Captum's ``Attribution`` base class, or an ImportError that says how to install it."""
    if _CaptumAttribution is None:
        raise ImportError("untangle_ext.captum needs Captum: pip install 'untangle-ext[ecosystem]' "
                          f"(or pip install captum); import failed with: {_CAPTUM_ERROR}")
    return _CaptumAttribution


def _target_tensor(target: Target, batch: int) -> Optional[torch.Tensor]:
    """Captum-style targets (int, list of ints, (B,) tensor) as what :meth:`Attributor.attribute` takes."""
    if target is None or isinstance(target, int):
        return target
    t = torch.as_tensor(target).long()
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, batch)):
        raise ValueError(f"target must be an int or one class id per image ({batch}), got shape {tuple(t.shape)}; "
                         "Captum's tuple targets (indices into a multi-dimensional output) do not apply to classifiers")
    return t.reshape(()) if t.numel() == 1 else t


class _UntangleAttribution(_CaptumAttribution or object):  # type: ignore[misc]
    """Shared body of the Captum classes: ``attribute`` runs :meth:`Attributor.attribute` with ``method``."""

    method: Method = "pattern_attribution"

    def __init__(self, model: nn.Module, stores: Stores = None, attributor: Optional[Attributor] = None):
        _require_captum()
        super().__init__(model)
        self.attributor = attributor if attributor is not None else Attributor(model, stores)

    def attribute(self, inputs: Union[torch.Tensor, tuple], target: Target = None) -> Union[torch.Tensor, tuple]:
        """Attributions of ``inputs`` (B, C, H, W) for ``target`` (default: the predicted class), same shape."""
        single = isinstance(inputs, torch.Tensor)
        if not single and (not isinstance(inputs, tuple) or len(inputs) != 1):
            raise ValueError("inputs must be one tensor (B, C, H, W) or a 1-tuple of it: our methods explain "
                             "classifiers with a single image input")
        x = inputs if single else inputs[0]
        out = self.attributor.attribute(x, target=_target_tensor(target, x.shape[0]), method=self.method)
        out = out.to(x.dtype)
        return out if single else (out,)

    def has_convergence_delta(self) -> bool:
        """False: these methods have no completeness axiom to measure."""
        return False


class PatternAttribution(_UntangleAttribution):
    """PatternAttribution (W ⊙ a⁺, the default method) as a Captum attribution."""

    method = "pattern_attribution"


class PatternNet(_UntangleAttribution):
    """PatternNet (the signal a⁺) as a Captum attribution."""

    method = "patternnet"


class Gradient(_UntangleAttribution):
    """The plain gradient through our reverse pass (no stores needed); equals ``captum.attr.Saliency(abs=False)``."""

    method = "gradient"


def quantus_explain(model: nn.Module, inputs: Any, targets: Any, *, stores: Stores = None,
                    method: Method = "pattern_attribution", check_fingerprint: bool = True,
                    **_ignored: Any) -> np.ndarray:
    """A Quantus ``explain_func``: numpy (B, C, H, W) in, numpy attributions of the same shape out.

    Pass ``explain_func_kwargs={"stores": stores, "method": ...}``. Quantus hands over the model it
    evaluates; for its randomisation metrics (randomised weights) pass ``check_fingerprint=False`` so
    the stores of the trained model are used with the randomised weights. Other kwargs Quantus adds
    (e.g. ``device``) are ignored.
    """
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
    t = torch.as_tensor(np.asarray(targets)).long().reshape(-1)
    attributor = Attributor(model, stores if method != "gradient" else None, check_fingerprint=check_fingerprint)
    return attributor.attribute(x, target=t, method=method).cpu().numpy()
