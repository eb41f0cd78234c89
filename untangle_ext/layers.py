"""Affine layer kinds: the layers that get patterns (SPEC §2).

Each kind is one class that owns everything specific to it: which module it
comes from, its forward, how a sample (a patch) and the per-feature shift are
laid out, which native op accumulates its moments, how a pattern is reversed,
and the rank of its weight. Adding a kind means adding one class here (and its
ops); :data:`AFFINE_KINDS` is the registry everything else reads.
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops


class UnsupportedModelError(TypeError):
    """The model contains a construct the engine cannot follow; the message names it and a workaround."""


class AffineLayer:
    """A Linear/ConvNd layer with BatchNorm folded in: weight (K, ...) and bias (K,), both new or shared tensors."""

    kind: ClassVar[str]
    module_type: ClassVar[type]
    weight_rank: ClassVar[int]

    def __init__(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.name = name
        self.weight = weight
        self.bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
        self.folded: Optional[str] = None  # name of the BatchNorm folded into this layer

    @classmethod
    def from_module(cls, name: str, module: nn.Module) -> "AffineLayer":
        bias = module.bias.detach() if module.bias is not None else None
        return cls(name, module.weight.detach(), bias)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def groups(self) -> int:
        return 1

    @property
    def in_features(self) -> int:
        """Input features (Linear) or channels (conv) the layer takes."""
        return self.weight.shape[1] * self.groups

    @property
    def patch_size(self) -> int:
        """Length D_g of one sample seen by one neuron."""
        return self.weight[0].numel()

    def signature(self) -> dict:
        """What a store records to recognise this layer."""
        return {"name": self.name, "kind": self.kind, "weight_shape": list(self.weight.shape)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, weight={tuple(self.weight.shape)})"

    # --- the kind-specific part ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def shift_dims(self, x: torch.Tensor) -> list[int]:
        """Dims of the input averaged to get the per-feature (or per-channel) shift."""
        raise NotImplementedError

    def patch_shift(self, shift: torch.Tensor) -> torch.Tensor:
        """The shift laid out like one patch, (G, D_g)."""
        raise NotImplementedError

    def accumulate(self, x, shift, out_offset, slots, mat, vec) -> torch.Tensor:
        """Add the moments of ``x`` (rows to ``slots``) into ``mat``/``vec`` and return the layer output."""
        raise NotImplementedError

    def reverse(self, grad: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor,
                input_shape: torch.Size) -> torch.Tensor:
        """Reverse ``grad`` (pairs, *output) through ``weights[slots[i]]`` used as this layer's weight."""
        raise NotImplementedError

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Every sample of ``x`` as rows (B, L, D): what one neuron sees at each of L positions."""
        raise NotImplementedError


class Linear(AffineLayer):
    """``nn.Linear`` on inputs of any rank: every leading position (e.g. each token) is a sample."""

    kind = "linear"
    module_type = nn.Linear
    weight_rank = 2

    def forward(self, x, weight=None):
        return F.linear(x, self.weight if weight is None else weight, self.bias)

    def shift_dims(self, x):
        return list(range(x.dim() - 1))

    def patch_shift(self, shift):
        return shift.reshape(1, -1)

    @staticmethod
    def _rows(x: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, ..., D) → (N·T, D) rows and their slots (each image's slot repeated over its positions)."""
        per_image = x[0].numel() // x.shape[-1] if x.shape[0] else 1
        # The batch's own slots tensor when 2-d: the native op caches its slot order per tensor.
        return x.reshape(-1, x.shape[-1]), slots if per_image == 1 else slots.repeat_interleave(per_image)

    def accumulate(self, x, shift, out_offset, slots, mat, vec):
        rows, row_slots = self._rows(x, slots)
        z = ops.accumulate_linear(rows, self.weight, shift, out_offset, row_slots, mat, vec)
        return z.view(*x.shape[:-1], self.out_features)

    def reverse(self, grad, weights, slots, input_shape):
        rows, row_slots = self._rows(grad, slots)
        out = ops.pattern_backward_linear(rows, weights, row_slots)
        return out.view(*grad.shape[:-1], weights.shape[-1])

    def patches(self, x):
        return x.reshape(x.shape[0], -1, x.shape[-1])


class Conv(AffineLayer):
    """``nn.ConvNd`` with zero padding (any stride, dilation, groups): a sample is one input patch."""

    rank: ClassVar[int]

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls.weight_rank = cls.rank + 2

    def __init__(self, name, weight, bias, stride=None, padding=None, dilation=None, groups: int = 1):
        super().__init__(name, weight, bias)
        ones = (1,) * self.rank
        self.stride = tuple(stride or ones)
        self.padding = tuple(padding or (0,) * self.rank)
        self.dilation = tuple(dilation or ones)
        self._groups = groups

    @property
    def groups(self) -> int:
        return self._groups

    @classmethod
    def from_module(cls, name, module):
        kind = type(module).__name__
        if module.padding_mode != "zeros":
            raise UnsupportedModelError(f"{kind} '{name}' uses padding_mode={module.padding_mode!r}; only zero "
                                        "padding is supported (pad explicitly with F.pad before the layer instead)")
        padding = module.padding
        if padding == "valid":
            padding = (0,) * cls.rank
        elif padding == "same":
            if any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
                raise UnsupportedModelError(f"{kind} '{name}': padding='same' with an even (dilated) kernel pads "
                                            "asymmetrically, which is not supported; pad explicitly instead")
            padding = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
        bias = module.bias.detach() if module.bias is not None else None
        return cls(name, module.weight.detach(), bias, module.stride, padding, module.dilation, module.groups)

    def forward(self, x, weight=None):
        w = self.weight if weight is None else weight
        return torch.ops.aten.convolution(x, w, self.bias, list(self.stride), list(self.padding),
                                          list(self.dilation), False, [0] * self.rank, self.groups)

    def shift_dims(self, x):
        return [0] + list(range(2, x.dim()))

    def patch_shift(self, shift):
        kernel = self.weight[0, 0].numel()
        return shift.reshape(self.groups, -1).repeat_interleave(kernel, dim=1)

    def accumulate(self, x, shift, out_offset, slots, mat, vec):
        return ops.accumulate_conv(x, self.weight, shift, out_offset, slots, mat, vec, list(self.stride),
                                   list(self.padding), list(self.dilation), self.groups)

    def reverse(self, grad, weights, slots, input_shape):
        return ops.pattern_backward_conv(grad, weights, slots, list(input_shape[2:]), list(self.stride),
                                         list(self.padding), list(self.dilation), self.groups)

    def patches(self, x):
        total = self.positions(x)
        index = torch.arange(total, device=x.device).expand(x.shape[0], total)
        return self.patches_at(x, index).view(x.shape[0], total, -1)

    def positions(self, x: torch.Tensor) -> int:
        """Output positions per image of ``x`` (samples per image)."""
        return math.prod(self._output_size(x))

    def _output_size(self, x: torch.Tensor) -> list[int]:
        return [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
                zip(x.shape[2:], self.weight.shape[2:], self.stride, self.padding, self.dilation)]

    def patches_at(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The patches at flat output positions ``index`` (B, k) of each image, as rows (B·k, D); only those are copied.

        One gather from the zero-padded input: each row is its corner's offset plus the fixed
        offsets of a patch's entries (C, *kernel), so the cost is that of the copied rows alone.
        """
        pad = [p for p in reversed(self.padding) for _ in range(2)]
        padded = (F.pad(x, pad) if any(pad) else x).contiguous()
        st = padded.stride()
        coords = torch.unravel_index(index.reshape(-1), self._output_size(x))
        corner = torch.arange(x.shape[0], device=x.device).repeat_interleave(index.shape[1]) * st[0]
        entry = torch.arange(x.shape[1], device=x.device) * st[1]
        for i, (c, k, s, d) in enumerate(zip(coords, self.weight.shape[2:], self.stride, self.dilation)):
            corner = corner + c * (s * st[2 + i])
            entry = (entry.unsqueeze(-1) + torch.arange(k, device=x.device) * (d * st[2 + i])).reshape(-1)
        return padded.reshape(-1)[corner.unsqueeze(1) + entry]


class Conv1d(Conv):
    kind, module_type, rank = "conv1d", nn.Conv1d, 1


class Conv2d(Conv):
    kind, module_type, rank = "conv2d", nn.Conv2d, 2


class Conv3d(Conv):
    kind, module_type, rank = "conv3d", nn.Conv3d, 3


#: Every affine kind, by the name stores record.
AFFINE_KINDS: dict[str, type[AffineLayer]] = {cls.kind: cls for cls in (Linear, Conv1d, Conv2d, Conv3d)}


def affine_for(module: nn.Module) -> Optional[type[AffineLayer]]:
    """The affine kind of a module, or None when it is not one."""
    return next((cls for cls in AFFINE_KINDS.values() if isinstance(module, cls.module_type)), None)
