"""Pure-PyTorch implementations of the engine's two hot operations.

These are the fallback backend and the oracle that the native kernels are
tested against. Only :mod:`untangle_ext.ops` imports this module.

Moment accumulation (SPEC §2) for one affine layer and a batch:

* ``x~ = x - shift_x`` (conv: the padded image minus a per-channel shift, so
  padded positions carry ``-shift`` like every other patch entry),
* ``y~ = W x~`` (equals ``y - W shift_x`` exactly, without cancellation),
* ``z = y~ + out_offset`` where ``out_offset = W shift_x + b`` (float64): the
  layer's output, returned so the forward pass continues with it,
* gate ``g = z > 0``,
* per class slot ``s`` (``slots == s``), with ``G`` groups of ``Kg`` outputs and
  patches of length ``Dg``::

      mat[s, g] += [y~ | g | g*y~ | 1]^T x~      shape (3*Kg + 1, Dg)
      vec[s]    += [sum y~, sum g, sum g*y~, n]  (3K + 1)

  (the layout is owned by :mod:`untangle_ext.moments`, which names every block).

  summed over samples (and output positions for conv). ``mat`` and ``vec`` are
  float64. Linear products are formed in float64 (an in-place ``addmm``); conv
  products in the input dtype over chunks of at most :data:`CHUNK_SAMPLES` samples
  (images x output positions), each chunk added to ``mat``.

Convolutions have 1, 2 or 3 spatial dimensions (``len(stride)``).

Pattern backward for ``N`` (image, class) pairs: pair ``i`` is reversed
through ``patterns[slots[i]]`` (the transpose of a Linear / ConvNd layer whose
weight is that pattern).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

#: Samples (images x output positions) per conv product below float64; the native driver's kChunkSamples.
CHUNK_SAMPLES = 512


def _design(y_tilde: torch.Tensor, z: torch.Tensor, groups: int) -> torch.Tensor:
    """Stack ``[y~ | g | g*y~ | 1]`` per group along dim 1 (channels/features)."""
    gate = (z > 0).to(y_tilde.dtype)
    n, k = y_tilde.shape[:2]
    rest = y_tilde.shape[2:]
    kg = k // groups
    parts = [
        y_tilde.reshape(n, groups, kg, *rest),
        gate.reshape(n, groups, kg, *rest),
        (gate * y_tilde).reshape(n, groups, kg, *rest),
        y_tilde.new_ones((n, groups, 1, *rest)),
    ]
    return torch.cat(parts, dim=2).reshape(n, groups * (3 * kg + 1), *rest)


def _vector_sums(y_tilde: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-output sums in the order of ``moments.VEC_FIELDS``, then the sample count; float64."""
    y = y_tilde.double()
    gate = (z > 0).double()
    dims = [0] + list(range(2, y.dim()))
    sums = [y.sum(dims), gate.sum(dims), (gate * y).sum(dims)]
    count = y.new_tensor([y.numel() / y.shape[1]])
    return torch.cat(sums + [count])


def _scatter_by_slot(slots: torch.Tensor, num_slots: int, update) -> None:
    """Call ``update(slot, row_index)`` for every slot present in ``slots``."""
    present = torch.unique(slots[(slots >= 0) & (slots < num_slots)])
    for s in present.tolist():
        update(s, (slots == s).nonzero().squeeze(1))


def accumulate_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    shift_x: torch.Tensor,
    out_offset: torch.Tensor,
    slots: torch.Tensor,
    mat: torch.Tensor,
    vec: torch.Tensor,
) -> torch.Tensor:
    """Accumulate Linear-layer moments of ``x`` (N, D) into ``mat``/``vec``; return the output."""
    x_tilde = x - shift_x.to(x.dtype)
    y_tilde = x_tilde @ weight.t()
    z = y_tilde + out_offset.to(x.dtype)
    design = _design(y_tilde, z, 1)

    def update(s: int, rows: torch.Tensor) -> None:
        mat[s, 0].addmm_(design[rows].t().double(), x_tilde[rows].double())
        vec[s] += _vector_sums(y_tilde[rows], z[rows])

    _scatter_by_slot(slots, mat.shape[0], update)
    return z


def shifted_padded_input(x: torch.Tensor, shift_c: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    """Zero-pad every spatial dim, then subtract the per-channel shift everywhere (padding included)."""
    pad = [p for p in reversed(list(padding)) for _ in range(2)]
    padded = F.pad(x, pad) if any(pad) else x
    return padded - shift_c.to(x.dtype).view(1, -1, *([1] * len(padding)))


def accumulate_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    shift_c: torch.Tensor,
    out_offset: torch.Tensor,
    slots: torch.Tensor,
    mat: torch.Tensor,
    vec: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Accumulate ConvNd moments (patches of ``x``, N×C×spatial) into ``mat``/``vec``; return the output."""
    nd = len(stride)
    x_tilde = shifted_padded_input(x, shift_c, padding)
    y_tilde = torch.ops.aten.convolution(x_tilde, weight, None, list(stride), [0] * nd, list(dilation),
                                         False, [0] * nd, groups)
    z = y_tilde + out_offset.to(x.dtype).view(1, -1, *([1] * nd))
    design = _design(y_tilde, z, groups)
    kg = weight.shape[0] // groups
    wshape = [design.shape[1], *weight.shape[1:]]
    positions = max(1, math.prod(y_tilde.shape[2:]))
    chunk = max(1, x.shape[0]) if x.dtype == torch.float64 else max(1, CHUNK_SAMPLES // positions)

    def update(s: int, rows: torch.Tensor) -> None:
        for part in rows.split(chunk):
            _, grad_w, _ = torch.ops.aten.convolution_backward(
                design[part], x_tilde[part], weight.new_empty(wshape), None, list(stride), [0] * nd, list(dilation),
                False, [0] * nd, groups, [False, True, False],
            )
            mat[s] += grad_w.reshape(groups, 3 * kg + 1, -1).double()
        vec[s] += _vector_sums(y_tilde[rows], z[rows])

    _scatter_by_slot(slots, mat.shape[0], update)
    return z


def pattern_backward_linear(grad_out: torch.Tensor, patterns: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Reverse ``grad_out`` (N, K) through ``patterns[slots[i]]`` (S, K, D) per row."""
    if patterns.shape[0] == 1:
        return grad_out @ patterns[0]
    grad_in = grad_out.new_zeros((grad_out.shape[0], patterns.shape[2]))

    def update(s: int, rows: torch.Tensor) -> None:
        grad_in[rows] = grad_out[rows] @ patterns[s]

    _scatter_by_slot(slots, patterns.shape[0], update)
    return grad_in


def pattern_backward_conv(
    grad_out: torch.Tensor,
    patterns: torch.Tensor,
    slots: torch.Tensor,
    input_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Reverse ``grad_out`` (N, K, *out_size) through the conv whose weight is ``patterns[slots[i]]``."""
    channels = patterns.shape[2] * groups
    in_shape = [grad_out.shape[0], channels, *input_size]

    def backward(go: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        shape = [go.shape[0], channels, *input_size]
        grad_in, _, _ = torch.ops.aten.convolution_backward(
            go, go.new_empty(1).expand(shape), w, None, list(stride), list(padding), list(dilation),
            False, [0] * len(stride), groups, [True, False, False],
        )
        return grad_in

    if patterns.shape[0] == 1:
        return backward(grad_out, patterns[0])
    grad_in = grad_out.new_zeros(in_shape)

    def update(s: int, rows: torch.Tensor) -> None:
        grad_in[rows] = backward(grad_out[rows], patterns[s])

    _scatter_by_slot(slots, patterns.shape[0], update)
    return grad_in
