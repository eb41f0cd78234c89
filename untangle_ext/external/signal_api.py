"""The tutorial's low-level entry point: attributions of a batch for one class, shaped like the input."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .. import validation
from ..compat import add_stores, attributor_for, resolve_args


def _attribute(model: nn.Module, input: torch.Tensor, signal_store_path: str, class_idx: Any,  # noqa: A002
               args: Any) -> torch.Tensor:
    """PatternAttribution of ``input`` (N, C, H, W) for class ``class_idx`` (int or '3') → (N, C, H, W).

    Uses the store ``f"{signal_store_path}_class_{class_idx}.pkl"``; the model is traced once and never modified.
    """
    a = resolve_args(args)
    x = validation.image_batch(input, a.img_size, "input")
    attributor = attributor_for(model, a)
    classes = validation.class_ids(class_idx, attributor.num_classes, "class_idx")
    if len(classes) != 1:
        raise validation.ClassIdError(f"class_idx={class_idx!r}: _attribute explains ONE class; call it once per class")
    add_stores(attributor, model, signal_store_path, classes)
    return attributor.attribute(x, target=classes[0])
