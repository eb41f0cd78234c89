"""Input checks for estimation and attribution (SPEC §4).

Every bad input raises an :class:`InputError` subclass (a ``ValueError``;
dtype problems are also ``TypeError``) whose message names the batch, the
cause and the fix. Documented behaviours that are not errors:

* images on the CPU are moved to the model's device (the usual DataLoader
  pattern); images on any other device than the model's are an error;
* floating images are cast to the model's dtype; integer images are an error
  (8-bit images need ``x.float() / 255`` first, which we cannot guess);
* a class whose loader yields no images gets an :class:`EmptyClassWarning` and
  no store file.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Any, Iterable, Optional, Sequence

import torch

from .trace import Program


class InputError(ValueError):
    """A bad input to estimation or attribution; the message names the cause and the fix."""


class NonFiniteInputError(InputError):
    """NaN or Inf in a batch of images (or in the model's weights)."""


class InputShapeError(InputError):
    """Images of a shape the model (or the signal store) does not expect."""


class InputDtypeError(InputError, TypeError):
    """Images or labels of the wrong type or dtype."""


class DeviceMismatchError(InputError):
    """Model and inputs (or the model's own layers) on different devices."""


class LabelError(InputError):
    """Labels out of range or not one per image."""


class TopKError(InputError):
    """``topk`` is not an int in [1, number of classes]."""


class EmptyClassWarning(UserWarning):
    """A class's loader yielded no images: no store is written for it."""


def check_model(program: Program) -> torch.device:
    """The model's affine layers are on one device and finite; returns that device."""
    devices = sorted({str(t.device) for l in program.layers for t in (l.weight, l.bias)})
    if len(devices) > 1:
        raise DeviceMismatchError(f"the model's layers are on several devices {devices}; move the whole model "
                                  "to one device with model.to(device)")
    for layer in program.layers:
        if not (torch.isfinite(layer.weight).all() and torch.isfinite(layer.bias).all()):
            folded = f" (with BatchNorm '{layer.folded}' folded in)" if layer.folded else ""
            raise NonFiniteInputError(f"the model's layer '{layer.name}'{folded} has NaN/Inf weights or bias; "
                                      "reload a healthy checkpoint before estimating or explaining")
    return program.layers[0].weight.device


def batches_of(loader: Any, where: str) -> Iterable:
    """``loader`` itself after checking that it can be iterated."""
    if loader is None or not hasattr(loader, "__iter__"):
        raise InputError(f"{where} is a {type(loader).__name__}, not an iterable of (images, labels) batches; "
                         "pass a DataLoader or any iterable of such pairs")
    return loader


def split_batch(batch: Any, where: str) -> tuple[Any, Any]:
    """``(images, labels)`` of one batch."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise InputError(f"{where} is a {type(batch).__name__}{'' if not hasattr(batch, '__len__') else ' of ' + str(len(batch))}"
                     "; a loader must yield (images, labels) pairs, e.g. a DataLoader over a labelled dataset")


def check_images(x: Any, device: torch.device, dtype: torch.dtype, where: str,
                 expected: Optional[Sequence[int]] = None) -> torch.Tensor:
    """A finite floating (B, ...) tensor on ``device`` in ``dtype``, per-image shape ``expected`` if given."""
    if not isinstance(x, torch.Tensor):
        raise InputDtypeError(f"{where}: images must be a torch.Tensor, not {type(x).__name__}; "
                              "convert with torch.as_tensor(...)")
    if not x.dtype.is_floating_point:
        raise InputDtypeError(f"{where}: images have dtype {x.dtype}; they must be floating point in the range the "
                              "model was trained on (e.g. x.float() / 255 for 8-bit images)")
    if x.device != device:
        if x.device.type != "cpu":
            raise DeviceMismatchError(f"{where}: images are on {x.device} but the model is on {device}; move one "
                                      f"of them: x.to('{device}') or model.to('{x.device}')")
    x = x.to(device, dtype)
    if x.dim() < 2:
        raise InputShapeError(f"{where}: images of shape {tuple(x.shape)} have no batch dimension; pass a "
                              "batch (B, C, H, W), e.g. x.unsqueeze(0) for one image")
    if expected is not None and tuple(x.shape[1:]) != tuple(expected):
        raise InputShapeError(f"{where}: images have shape {tuple(x.shape[1:])} (batch {x.shape[0]}), expected "
                              f"{tuple(expected)}{_shape_hint(tuple(x.shape), tuple(expected))}")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = int(bad.flatten(1).any(1).nonzero()[0])
        raise NonFiniteInputError(f"{where}: {int(bad.sum())} NaN/Inf values (first in image {first} of the batch); "
                                  "clean or drop those images (e.g. torch.nan_to_num) before passing them")
    return x


def _shape_hint(got: tuple, expected: tuple) -> str:
    if got == expected:
        return "; this looks like one image without its batch dimension: use x.unsqueeze(0)"
    if len(got) == 4 and len(expected) == 3 and got[1:] == (expected[1], expected[2], expected[0]):
        return "; this looks like channels-last (B, H, W, C): use x.permute(0, 3, 1, 2)"
    return "; resize the images, or estimate the signals on images of this size"


def check_labels(labels: Any, batch_size: int, num_classes: int, where: str) -> torch.Tensor:
    """One integer class id in [0, num_classes) per image, as a flat tensor."""
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except Exception as exc:
            raise InputDtypeError(f"{where}: labels of type {type(labels).__name__} are not a tensor of class ids "
                                  f"({exc})") from None
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise InputDtypeError(f"{where}: labels have dtype {labels.dtype}; they must be integer class ids "
                              "(labels.long(); for one-hot labels labels.argmax(1))")
    labels = labels.reshape(-1)
    if labels.numel() != batch_size:
        raise LabelError(f"{where}: {labels.numel()} labels for {batch_size} images; give one class id per image "
                         "(for one-hot labels use labels.argmax(1))")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise LabelError(f"{where}: labels must lie in [0, {num_classes}) (the model has {num_classes} outputs); got "
                         f"min {int(labels.min())}, max {int(labels.max())}. Check the dataset's label mapping")
    return labels


def check_topk(topk: Any, num_classes: int) -> int:
    """``topk`` as an int in [1, num_classes]."""
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral):
        raise TopKError(f"topk must be an int, not {type(topk).__name__} {topk!r}")
    if not 1 <= topk <= num_classes:
        raise TopKError(f"topk={topk} must lie in [1, {num_classes}]: the model has {num_classes} classes; "
                        f"use topk <= {num_classes}")
    return int(topk)


def warn_empty(classes: Sequence[int]) -> None:
    """Warn that ``classes`` saw no images and get no store."""
    if classes:
        warnings.warn(f"no images for class(es) {list(classes)}: their loader was empty, so no signal store was "
                      "written for them. Check the loader / that the dataset has samples of these classes",
                      EmptyClassWarning, stacklevel=3)


class InputChecker:
    """Checks image batches against a model; optionally pins the first batch's shape for all later ones."""

    def __init__(self, program: Program, expected_shape: Optional[Sequence[int]] = None, pin: bool = False):
        self.program = program
        self.device = check_model(program)
        self.dtype = program.layers[0].weight.dtype
        self.expected: Optional[tuple[int, ...]] = None if expected_shape is None else tuple(int(s) for s in expected_shape)
        self.pin = pin
        self._fits: set[tuple[int, ...]] = set()

    def images(self, x: Any, where: str) -> torch.Tensor:
        """``x`` checked, on the model's device and dtype; a shape seen first is probed with one image."""
        x = check_images(x, self.device, self.dtype, where, self.expected)
        shape = tuple(x.shape[1:])
        if shape not in self._fits and x.shape[0]:
            self._probe(x[:1], where)
            self._fits.add(shape)
        if self.pin and self.expected is None:
            self.expected = shape
        return x

    def _probe(self, x: torch.Tensor, where: str) -> None:
        try:
            with torch.no_grad():
                self.program.forward(x)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            first = self.program.layers[0]
            takes = f"{first.in_features} input {'features' if first.kind == 'linear' else 'channels'}"
            raise InputShapeError(f"{where}: images of shape {tuple(x.shape[1:])} do not fit the model "
                                  f"({str(exc).splitlines()[0][:200]}); its first layer '{first.name}' takes {takes}. "
                                  "Pass images of the size the model was built for") from exc

