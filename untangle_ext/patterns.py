"""Patterns from moments: the linear (eq. 4) and two-component (eq. 8) estimators.

All arithmetic is float64. A neuron whose denominator ``w_k^T cov`` (or whose
regime count) is zero gets a zero pattern, never NaN or Inf.

Per neuron ``k`` of a regime (all samples, ``g_k = 1``, ``g_k = 0``) with ``n`` samples and the
sums about the shift ``s`` (``x~ = x - s``)::

    cov = Σy~x~/n - (Σx~/n) E[y~]  (+ s (E[y~ | regime] - E[y~]) for mean_y="all", regimes ±)
    a   = cov / (w_kᵀ cov)          0 where the regime is empty or w_kᵀ cov vanishes

The work is one fused pass per layer, :func:`untangle_ext.ops.layer_patterns`: native on CPU
(one read of the float64 sums, one write of each pattern in the store dtype; κ = ‖a‖·‖w‖ comes
with it, so :func:`~untangle_ext.conditioning.apply_limits` does not read the patterns again),
blocked PyTorch ops elsewhere (``untangle_ext._reference.layer_patterns``, the oracle; the
implementation for CUDA tensors).
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from . import ops
from .conditioning import ESTIMATORS, Limits, apply_limits
from .moments import LayerMoments

MeanY = Literal["all", "positive"]


def compute_patterns(lm: LayerMoments, slot: int, mean_y: MeanY = "all", dtype: torch.dtype = torch.float64,
                     limits: Limits = Limits(), keys: Sequence[str] = tuple(ESTIMATORS)) -> dict[str, torch.Tensor]:
    """The patterns ``keys`` (of ``a_lin``, ``a_pos``, ``a_neg``; shaped like the weight, float64 maths, stored
    as ``dtype``), counts and κ of all three, with ``limits`` applied. Patterns not in ``keys`` are never
    written (a store saved with ``keep=("a_pos",)`` needs one third of the memory and writes)."""
    if mean_y not in ("all", "positive"):
        raise ValueError(f"mean_y must be 'all' or 'positive', not {mean_y!r}")
    unknown = set(keys) - set(ESTIMATORS)
    if unknown:
        raise ValueError(f"keys must be among {tuple(ESTIMATORS)}, not {sorted(unknown)}")
    layer = lm.layer
    keep = [key in keys for key in ESTIMATORS]
    *found, kappa = ops.layer_patterns(lm.mat[slot], lm.vec[slot], layer.weight.detach(), lm.patch_shift(),
                                       mean_y == "positive", dtype, keep)
    patterns = {key: a for key, a, kept in zip(ESTIMATORS, found, keep) if kept}
    patterns.update(n_pos=lm.field("pos_n")[slot].clone(), n=lm.count[slot].clone())
    return apply_limits(patterns, layer.weight, limits, kappa)
