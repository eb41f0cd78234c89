"""Pure-PyTorch implementations of the engine's hot operations.

Moment accumulation here is the fallback backend and the reference the native
kernels are tested against; the pattern backward is ATen-only (a native version
measured no faster on VGG-style attribution and was removed). Only
:mod:`untangle_ext.ops` imports this module.

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

Patterns from one class's moments of one layer (:func:`layer_patterns`): the linear
(eq. 4) and two-component (eq. 8) estimators and κ, computed in blocks of neurons
(the float64 temporaries stay in cache); the formulas are :mod:`untangle_ext.patterns`'.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

#: Conv layers whose per-pair patterns (N pairs x one pattern) fit in this many bytes are reversed
#: in one grouped call; larger ones one class at a time.
PER_PAIR_BYTES = 8 << 20
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
    n, channels = grad_out.shape[0], patterns.shape[2] * groups

    def backward(go: torch.Tensor, w: torch.Tensor, rows: int, width: int, conv_groups: int) -> torch.Tensor:
        """The transposed conv of ``go`` for an input of (rows, width, *input_size) (only its shape is read)."""
        grad_in, _, _ = torch.ops.aten.convolution_backward(
            go, go.new_empty(1).expand(rows, width, *input_size), w, None, list(stride), list(padding),
            list(dilation), False, [0] * len(stride), conv_groups, [True, False, False],
        )
        return grad_in

    num_slots = patterns.shape[0]
    if num_slots == 1:
        return backward(grad_out, patterns[0], n, channels, groups)
    if 0 < n * patterns[0].numel() * patterns.element_size() <= PER_PAIR_BYTES:
        # Every pair brings its own class's pattern: ONE grouped transposed conv with the pairs
        # folded into the groups (6x faster than a call per class on LeNet's first layer).
        weights = patterns.index_select(0, slots.clamp(0, num_slots - 1))
        folded = backward(grad_out.reshape(1, -1, *grad_out.shape[2:]), weights.flatten(0, 1), 1, n * channels,
                          groups * n)
        skipped = (slots < 0) | (slots >= num_slots)
        return folded.view(n, channels, *input_size).masked_fill_(skipped.view(n, *[1] * (1 + len(stride))), 0)
    grad_in = grad_out.new_zeros((n, channels, *input_size))

    def update(s: int, rows: torch.Tensor) -> None:
        grad_in[rows] = backward(grad_out[rows], patterns[s], rows.numel(), channels, groups)

    _scatter_by_slot(slots, num_slots, update)
    return grad_in


# ---------------------------------------------------------------- patterns from moments
#: Relative size below which ``w^T cov`` counts as zero (a dead neuron); csrc/cpu/patterns.cpp uses the same.
DEAD = 1e-12
#: Elements of one float64 block temporary (5 live at once, in L2 instead of RAM): below PyTorch's
#: grain size (32768), so each op runs on one thread with no barrier (on a loaded machine 2-thread
#: ops on 1 MB blocks were measured 10x slower) and each row is reduced serially, as in the
#: whole-layer formulas (a row longer than this is blocked with >= one row per thread instead).
BLOCK_ELEMENTS = (1 << 15) - 1


class _Regime(NamedTuple):
    """Per-neuron scalars of one regime, as (G, Kg, 1) columns: 1/n's divisor, E[y] and the shift term."""

    n1: torch.Tensor     # count clamped to >= 1
    ey: torch.Tensor     # the E[y] subtracted from x~y
    delta: Optional[torch.Tensor]  # E[y|regime] - E[y] multiplying the shift (mean_y="all"), else None
    alive: torch.Tensor  # (G, Kg) bool


def _regimes(vec: torch.Tensor, groups: int, positive_mean_y: bool) -> tuple[_Regime, _Regime, _Regime]:
    """The linear, positive and negative regimes' per-neuron scalars from ``vec`` = [Σy~ | n+ | Σg y~ | n]."""
    k = (vec.shape[0] - 1) // 3
    col = lambda t: t.reshape(groups, k // groups, 1)  # noqa: E731
    n = vec[-1].expand(k)
    sum_y, n_pos, pos_sum_y = vec[:k], vec[k:2 * k], vec[2 * k:3 * k]
    ey_all = sum_y / n.clamp(min=1)

    def regime(cnt: torch.Tensor, sy: torch.Tensor) -> _Regime:
        ey = sy / cnt.clamp(min=1)
        if positive_mean_y:
            return _Regime(col(cnt.clamp(min=1)), col(ey), None, (cnt > 0).reshape(groups, -1))
        return _Regime(col(cnt.clamp(min=1)), col(ey_all), col(ey - ey_all), (cnt > 0).reshape(groups, -1))

    lin = _Regime(col(n.clamp(min=1)), col(ey_all), None, (n > 1).reshape(groups, -1))
    return lin, regime(n_pos, pos_sum_y), regime(n - n_pos, sum_y - pos_sum_y)


def _cov_into(out: torch.Tensor, tmp: torch.Tensor, sxy: torch.Tensor, sx: torch.Tensor, shift: torch.Tensor,
              r: _Regime, gi: int, rows: slice) -> None:
    """``out = sxy/n - (sx/n) E[y] (+ shift * delta)``: one regime's covariance for a block of rows."""
    n1 = r.n1[gi, rows]
    torch.div(sxy, n1, out=out)
    torch.div(sx, n1, out=tmp)
    tmp.mul_(r.ey[gi, rows])
    out.sub_(tmp)
    if r.delta is not None:
        torch.mul(shift, r.delta[gi, rows], out=tmp)
        out.add_(tmp)


def _normalise_into(dst: torch.Tensor, cov: torch.Tensor, tmp: torch.Tensor, w: torch.Tensor,
                    w_norm: torch.Tensor, alive: torch.Tensor) -> None:
    """``dst = cov / (w_k^T cov_k)`` (rounded once to ``dst``'s dtype); rows of dead neurons or vanishing denominators are zero."""
    den = torch.mul(w, cov, out=tmp).sum(1)
    scale = w_norm * cov.norm(dim=1)
    ok = alive & torch.isfinite(den) & (den.abs() > DEAD * scale) & (den != 0)
    torch.div(cov, torch.where(ok, den, torch.ones_like(den)).unsqueeze(1), out=dst)
    dst.masked_fill_(~ok.unsqueeze(1), 0.0)


def _block_rows(kg: int, dg: int) -> int:
    """Neurons per block: as many rows as fit in :data:`BLOCK_ELEMENTS`, else one row per thread."""
    rows = BLOCK_ELEMENTS // max(dg, 1)
    return min(kg, rows if rows >= 1 else torch.get_num_threads())


def layer_patterns(sums: torch.Tensor, vec: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor,
                   positive_mean_y: bool, dtype: torch.dtype, keep: Sequence[bool] = (True, True, True)
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a_lin, a_pos, a_neg`` (shaped like ``weight``, float64 maths rounded once to ``dtype``; an empty tensor
    where ``keep`` is false) and κ (3, K) of all three.

    ``sums`` (G, 3Kg+1, Dg) and ``vec`` (3K+1) are one slot of the moments (layout:
    :mod:`untangle_ext.moments`), ``shift`` (G, Dg) the shift in patch space. κ = ‖a‖·‖w‖ per neuron of
    the stored (rounded) patterns, float64, 0 where the pattern is 0. The native op (csrc/cpu/patterns.cpp)
    runs this on CPU; this PyTorch code is the implementation for CUDA tensors and without the extension.
    """
    g, rows_per_group, dg = sums.shape
    kg = (rows_per_group - 1) // 3
    sxy, spx, spxy, sx = sums[:, :kg], sums[:, kg:2 * kg], sums[:, 2 * kg:3 * kg], sums[:, 3 * kg:]
    w = weight.detach().reshape(g, kg, dg)
    regimes = _regimes(vec, g, positive_mean_y)
    out = [torch.empty((g, kg, dg) if kept else (0,), dtype=dtype, device=sums.device) for kept in keep]
    kappa = torch.empty((3, g, kg), dtype=torch.float64, device=sums.device)
    rows = _block_rows(kg, dg)
    scratch = torch.empty((5, rows, dg), dtype=torch.float64, device=sums.device)
    dropped = torch.empty((rows, dg), dtype=dtype, device=sums.device)  # where a pattern not kept is rounded
    for gi in range(g):
        for r0 in range(0, kg, rows):
            r1 = min(r0 + rows, kg)
            rs, b = slice(r0, r1), r1 - r0
            wb, tmp, dxy, dx, cov = (s[:b] for s in scratch)
            wb.copy_(w[gi, rs])
            w_norm = wb.norm(dim=1)
            sx_g, shift_g = sx[gi], shift[gi:gi + 1]
            torch.sub(sxy[gi, rs], spxy[gi, rs], out=dxy)
            torch.sub(sx_g, spx[gi, rs], out=dx)
            block_sums = ((sxy[gi, rs], sx_g), (spxy[gi, rs], spx[gi, rs]), (dxy, dx))
            for e, ((s_xy, s_x), r, o) in enumerate(zip(block_sums, regimes, out)):
                _cov_into(cov, tmp, s_xy, s_x, shift_g, r, gi, rs)
                dst = o[gi, rs] if o.numel() else dropped[:b]
                _normalise_into(dst, cov, tmp, wb, w_norm, r.alive[gi, rs])
                kappa[e, gi, rs] = torch.linalg.vector_norm(dst, dim=1, dtype=torch.float64) * w_norm
    a_lin, a_pos, a_neg = (o.reshape(weight.shape) if o.numel() else o for o in out)
    return a_lin, a_pos, a_neg, kappa.reshape(3, -1)
