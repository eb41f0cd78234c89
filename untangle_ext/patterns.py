"""Patterns from moments: the linear (eq. 4) and two-component (eq. 8) estimators.

All arithmetic is float64. A neuron whose denominator ``w_k^T cov`` (or whose
regime count) is zero gets a zero pattern, never NaN or Inf.
"""
from __future__ import annotations

from typing import Literal

import torch

from .conditioning import Limits, apply_limits
from .moments import LayerMoments

MeanY = Literal["all", "positive"]
#: Relative size below which ``w^T cov`` counts as zero (a dead neuron).
_DEAD = 1e-12


def _normalise(cov: torch.Tensor, w: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``a_k = cov_k / (w_k^T cov_k)``, zero where the neuron is dead or the denominator vanishes."""
    den = (w * cov).sum(1)
    scale = w.norm(dim=1) * cov.norm(dim=1)
    ok = alive & torch.isfinite(den) & (den.abs() > _DEAD * scale) & (den != 0)
    safe = torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok.unsqueeze(1), cov / safe.unsqueeze(1), torch.zeros_like(cov))


def _regime_cov(sxy, sx, sy, n, ey_all, shift, mean_y: MeanY) -> torch.Tensor:
    """Covariance of x and y_k within one regime from shifted sums (the shift undone exactly)."""
    n_ = n.clamp(min=1).unsqueeze(1)
    ex = sx / n_
    ey = sy / n.clamp(min=1)
    if mean_y == "positive":
        return sxy / n_ - ex * ey.unsqueeze(1)
    return sxy / n_ - ex * ey_all.unsqueeze(1) + shift * (ey - ey_all).unsqueeze(1)


def compute_patterns(lm: LayerMoments, slot: int, mean_y: MeanY = "all",
                     limits: Limits = Limits()) -> dict[str, torch.Tensor]:
    """Patterns ``a_lin``, ``a_pos``, ``a_neg`` (shaped like the weight, float64), counts and κ for one slot."""
    if mean_y not in ("all", "positive"):
        raise ValueError(f"mean_y must be 'all' or 'positive', not {mean_y!r}")
    layer = lm.layer
    k, g = layer.out_features, layer.groups
    sxy, spx, spxy, sx = (lm.per_neuron(b, slot) for b in ("sum_yx", "pos_sum_x", "pos_sum_yx", "sum_x"))
    shift = lm.patch_shift().repeat_interleave(k // g, dim=0)
    w = layer.weight.double().reshape(k, -1)

    n = lm.count[slot].expand(k)
    n_pos = lm.field("pos_n")[slot]
    n_neg = n - n_pos
    sum_y, pos_sum_y = lm.field("sum_y")[slot], lm.field("pos_sum_y")[slot]
    ey_all = sum_y / n.clamp(min=1)

    cov = sxy / n.clamp(min=1).unsqueeze(1) - (sx / n.clamp(min=1).unsqueeze(1)) * ey_all.unsqueeze(1)
    cov_pos = _regime_cov(spxy, spx, pos_sum_y, n_pos, ey_all, shift, mean_y)
    cov_neg = _regime_cov(sxy - spxy, sx - spx, sum_y - pos_sum_y, n_neg, ey_all, shift, mean_y)
    shape = layer.weight.shape
    return apply_limits({
        "a_lin": _normalise(cov, w, n > 1).reshape(shape),
        "a_pos": _normalise(cov_pos, w, n_pos > 0).reshape(shape),
        "a_neg": _normalise(cov_neg, w, n_neg > 0).reshape(shape),
        "n_pos": n_pos.clone(),
        "n": lm.count[slot].clone(),
    }, layer.weight, limits)
