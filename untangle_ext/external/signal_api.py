"""The tutorial's low-level entry point: attributions of a batch for one class, shaped like the input."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..attribution import Attributor
from ..compat import check_model, load_stores, resolve_args
from ..loaders import parse_classes
from ..trace import Program


def _attribute(model: nn.Module, input: torch.Tensor, signal_store_path: str, class_idx: Any,  # noqa: A002
               args: Any) -> torch.Tensor:
    """PatternAttribution of ``input`` (N, C, H, W) for class ``class_idx`` (int or '3') → (N, C, H, W).

    Uses the store ``f"{signal_store_path}_class_{class_idx}.pkl"``; the model is never modified.
    """
    a = resolve_args(args)
    program = Program(model)
    check_model(program, a)
    classes = parse_classes(class_idx, program.num_outputs)
    if len(classes) != 1:
        raise ValueError(f"_attribute explains ONE class, got class_idx={class_idx!r}")
    if not isinstance(input, torch.Tensor) or input.dim() != 4:
        raise ValueError(f"input must be a tensor (N, C, H, W), got {getattr(input, 'shape', type(input).__name__)}")
    if a.img_size is not None and tuple(input.shape[1:]) != a.img_size:
        raise ValueError(f"the input has images of shape {tuple(input.shape[1:])} but args.img_size is "
                         f"{a.img_size}; fix args.img_size or resize the input")
    attributor = Attributor(model, load_stores(signal_store_path, classes))
    return attributor.attribute(input, target=classes[0])
