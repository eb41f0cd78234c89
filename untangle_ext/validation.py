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

This module is the one owner of input checks: the native API, the tutorial API
(``args.topk``, ``class_idx``, ...), the loaders and the CLI all call the functions
below with ``name`` = the argument as *their* caller wrote it, so a message says
``args.topk=11`` to a tutorial script, ``--topk 11`` to a shell user and
``topk=11`` to the native API.
"""
from __future__ import annotations

import numbers
import os
import re
import warnings
from pathlib import Path
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


class ArgumentError(InputError):
    """An argument (not an image or a label) has a bad value."""


class ClassIdError(ArgumentError):
    """A class id that is not an integer in [0, number of classes)."""


class MissingDataError(ArgumentError, FileNotFoundError):
    """A data folder the caller named does not exist."""


class EmptyLoaderError(InputError):
    """A loader that yielded no images at all: there is nothing to estimate."""


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
    check_shape(x.shape, expected, where)
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = int(bad.flatten(1).any(1).nonzero()[0])
        raise NonFiniteInputError(f"{where}: {int(bad.sum())} NaN/Inf values (first in image {first} of the batch); "
                                  "clean or drop those images (e.g. torch.nan_to_num) before passing them")
    return x


def _shape_hint(got: tuple, expected: tuple) -> str:
    if got == expected:
        return "; this looks like one image without its batch dimension: use x.unsqueeze(0)"
    if got == expected[1:]:
        return "; this looks like one image without its batch and channel dimensions: use x[None, None]"
    if len(got) == 4 and len(expected) == 3 and got[1:] == (expected[1], expected[2], expected[0]):
        return "; this looks like channels-last (B, H, W, C): use x.permute(0, 3, 1, 2)"
    return _RESIZE


_RESIZE = "; resize the images, or estimate the signals on images of this size"


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


def check_topk(topk: Any, num_classes: int, name: str = "topk") -> int:
    """``topk`` as an int in [1, num_classes]."""
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral):
        raise TopKError(f"{name} must be an int, not {type(topk).__name__} {topk!r}")
    if not 1 <= topk <= num_classes:
        raise TopKError(f"{_show(name, topk)} must lie in [1, {num_classes}]" + (
            f": it is larger than the number of classes ({num_classes})" if topk > num_classes else ""))
    return int(topk)


def _show(name: str, value: Any) -> str:
    """An argument as its caller wrote it: ``--topk 11`` for an option, ``args.topk=11`` otherwise."""
    return f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1 (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ArgumentError(f"{_show(name, value)}: must be a positive integer")
    return int(value)


def choice(value: Any, choices: Sequence[Any], name: str) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ArgumentError(f"{_show(name, value)}: must be one of {', '.join(map(repr, choices))}")
    return value


def boolean(value: Any, name: str) -> bool:
    """Booleans as the tutorial writes them: True/False, 0/1 or the strings 'True'/'False' (also yes/no)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ArgumentError(f"{_show(name, value)}: must be a boolean (True / False or 'True' / 'False')")


def class_ids(value: Any, num_classes: Optional[int], name: str) -> Optional[list[int]]:
    """Class ids as the tutorial writes them (None = all, 3, '945', a tensor, or a list of those) → ints.

    With ``num_classes`` every id must lie in [0, num_classes).
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    items = list(value) if isinstance(value, (list, tuple, set, range)) else [value]
    if not items:
        raise ClassIdError(f"{name} is empty: pass None for every class, or a class id such as 3 or '3'")
    out = []
    for c in items:
        if isinstance(c, torch.Tensor) and c.numel() == 1:
            c = c.item()
        ok = not isinstance(c, bool) and (isinstance(c, numbers.Integral) or (isinstance(c, str) and c.strip().isdigit()))
        if not ok or (num_classes is not None and not 0 <= int(c) < num_classes):
            limit = f" in 0..{num_classes - 1} (the model has {num_classes} classes)" if num_classes is not None else ""
            raise ClassIdError(f"{name}: invalid class id {c!r}; class ids are integers{limit} (or such strings, "
                               "e.g. '3')")
        out.append(int(c))
    return out


def image_size(value: Any, name: str) -> Optional[tuple[int, ...]]:
    """An image size (C, H, W) of positive ints, or None (not checked)."""
    if value is None:
        return None
    size = tuple(value) if isinstance(value, (tuple, list, torch.Size)) else None
    if size is None or len(size) != 3 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1
                                             for v in size):
        raise ArgumentError(f"{_show(name, value)}: must be (C, H, W), e.g. (1, 28, 28)")
    return tuple(int(v) for v in size)


def check_shape(batch_shape: Sequence[int], expected: Optional[Sequence[int]], where: str,
                source: Optional[str] = None) -> None:
    """Raise :class:`InputShapeError` unless a batch shaped ``batch_shape`` holds images of shape ``expected``
    (None: anything); ``source`` names where ``expected`` comes from (e.g. ``args.img_size``)."""
    got, want = tuple(batch_shape), None if expected is None else tuple(expected)
    if want is None or got[1:] == want:
        return
    hint = _shape_hint(got, want)
    hint = f"; fix {source} or resize the images" if source and hint == _RESIZE else hint
    src = f" ({source})" if source else ""
    if len(got) != len(want) + 1:
        raise InputShapeError(f"{where}: got a tensor of shape {got}; expected a batch of images (B, "
                              f"{', '.join(map(str, want))}){src}{hint}")
    raise InputShapeError(f"{where}: images have shape {got[1:]} (batch of {got[0]}), expected {want}{src}{hint}")


def one_image(x: Any, img_size: Optional[Sequence[int]], name: str, size_name: str = "args.img_size") -> torch.Tensor:
    """ONE image, (1, C, H, W) or (C, H, W), optionally of size ``img_size`` = (C, H, W) → (1, C, H, W)."""
    if not isinstance(x, torch.Tensor):
        raise InputDtypeError(f"{name} must be a torch.Tensor (1, C, H, W), not {type(x).__name__}; convert with "
                              "torch.as_tensor(...)")
    batch = x.unsqueeze(0) if x.dim() == 3 else x
    if batch.dim() != 4 or batch.shape[0] != 1:
        raise InputShapeError(f"{name} has shape {tuple(x.shape)}; expected ONE image shaped (1, C, H, W); call once "
                              "per image (e.g. images[i][None])")
    check_shape(batch.shape, img_size, name, size_name)
    return batch


def image_batch(x: Any, img_size: Optional[Sequence[int]], name: str, size_name: str = "args.img_size") -> torch.Tensor:
    """A batch of images (N, C, H, W), optionally of size ``img_size`` = (C, H, W)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise InputShapeError(f"{name} must be a tensor (N, C, H, W), got "
                              f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_shape(x.shape, img_size, name, size_name)
    return x


def data_folder(path: Any, name: str, created: bool = False) -> Path:
    """The folder ``path`` the caller named; a missing one is an error (a typo must not fall back to other data),
    unless ``created`` (e.g. a download will create it)."""
    folder = Path(path).expanduser()
    if not folder.is_dir() and not created:
        flag = "--download" if name.startswith("--") else "download=True"
        raise MissingDataError(f"{_show(name, os.fspath(path))}: no such folder ({folder.resolve()}). Fix the path, "
                               f"pass {flag} to fetch MNIST into it, or leave it unset to use the bundled 5,000-image "
                               "sample")
    return folder


def check_mean_y(mean_y: Any, name: str = "mean_y") -> str:
    """``'all'`` (E[y] over all samples, the paper's eq. 8) or ``'positive'`` (E⁺[y])."""
    return choice(mean_y, ("all", "positive"), name)


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
            raise InputShapeError(f"{where}: images of shape {tuple(x.shape[1:])} (a batch shaped (B, "
                                  f"{', '.join(map(str, x.shape[1:]))})) do not fit the model: {_misfit(self.program, exc)}. "
                                  "Pass images of the size the model was built for (the size it was trained on)") from exc


def _misfit(program: Program, exc: RuntimeError) -> str:
    """Which layer refused the images, from torch's message (the raw message is kept at the end)."""
    raw = str(exc).splitlines()[0][:160]
    first = program.layers[0]
    match = re.search(r"\(\d+x(\d+) and (\d+)x(\d+)\)", raw)
    if match:
        got, takes, outs = (int(g) for g in match.groups())
        for layer in program.layers:
            if layer.kind == "linear" and tuple(layer.weight.shape) == (outs, takes):
                return (f"its Linear layer '{layer.name}' takes {takes} features but gets {got} from images of this "
                        f"size ({raw})")
    if first.kind != "linear":
        spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[first.weight.dim() - 2]
        return (f"its first layer '{first.name}' is a {type(first).__name__} taking (B, {first.in_features}, "
                f"{spatial}) ({raw})")
    return f"its first layer '{first.name}' takes {first.in_features} input features ({raw})"
