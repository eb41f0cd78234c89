"""Patterns from moments: the linear (eq. 4) and two-component (eq. 8) estimators.

All arithmetic is float64. A neuron whose denominator ``w_k^T cov`` (or whose
regime count) is zero gets a zero pattern, never NaN or Inf.

The work is done in blocks of neurons (rows of ``Dg`` inputs) whose float64
temporaries stay in cache, written into preallocated scratch with ``out=`` ops:
the cost is one read of the sums and one write of the patterns (memory speed),
and every element goes through the same float64 operations in the same order as
the whole-layer formulas, so the numbers are exactly the same.
"""
from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import torch

from .conditioning import Limits, apply_limits
from .moments import LayerMoments

MeanY = Literal["all", "positive"]
#: Relative size below which ``w^T cov`` counts as zero (a dead neuron).
_DEAD = 1e-12
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


def _regimes(lm: LayerMoments, slot: int, mean_y: MeanY) -> tuple[_Regime, _Regime, _Regime]:
    """The linear, positive and negative regimes' per-neuron scalars (same formulas as before blocking)."""
    g, k = lm.layer.groups, lm.layer.out_features
    col = lambda t: t.reshape(g, k // g, 1)  # noqa: E731
    n = lm.count[slot].expand(k)
    n_pos = lm.field("pos_n")[slot]
    n_neg = n - n_pos
    sum_y, pos_sum_y = lm.field("sum_y")[slot], lm.field("pos_sum_y")[slot]
    ey_all = sum_y / n.clamp(min=1)

    def regime(cnt: torch.Tensor, sy: torch.Tensor, alive: torch.Tensor) -> _Regime:
        ey = sy / cnt.clamp(min=1)
        if mean_y == "positive":
            return _Regime(col(cnt.clamp(min=1)), col(ey), None, alive.reshape(g, -1))
        return _Regime(col(cnt.clamp(min=1)), col(ey_all), col(ey - ey_all), alive.reshape(g, -1))

    lin = _Regime(col(n.clamp(min=1)), col(ey_all), None, (n > 1).reshape(g, -1))
    return lin, regime(n_pos, pos_sum_y, n_pos > 0), regime(n_neg, sum_y - pos_sum_y, n_neg > 0)


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
    ok = alive & torch.isfinite(den) & (den.abs() > _DEAD * scale) & (den != 0)
    torch.div(cov, torch.where(ok, den, torch.ones_like(den)).unsqueeze(1), out=dst)
    dst.masked_fill_(~ok.unsqueeze(1), 0.0)


def _block_rows(kg: int, dg: int) -> int:
    """Neurons per block: as many rows as fit in :data:`BLOCK_ELEMENTS`, else one row per thread."""
    rows = BLOCK_ELEMENTS // max(dg, 1)
    return min(kg, rows if rows >= 1 else torch.get_num_threads())


def compute_patterns(lm: LayerMoments, slot: int, mean_y: MeanY = "all",
                     dtype: torch.dtype = torch.float64, limits: Limits = Limits()) -> dict[str, torch.Tensor]:
    """Patterns ``a_lin``, ``a_pos``, ``a_neg`` (shaped like the weight; float64 maths, stored as ``dtype``) and counts."""
    if mean_y not in ("all", "positive"):
        raise ValueError(f"mean_y must be 'all' or 'positive', not {mean_y!r}")
    layer = lm.layer
    k, g = layer.out_features, layer.groups
    sxy, spx, spxy, sx = (lm.block(b)[slot] for b in ("sum_yx", "pos_sum_x", "pos_sum_yx", "sum_x"))
    kg, dg = sxy.shape[1], sxy.shape[2]
    shift = lm.patch_shift()
    w = layer.weight.detach().reshape(g, kg, dg)
    regimes = _regimes(lm, slot, mean_y)
    out = [torch.empty((g, kg, dg), dtype=dtype, device=sxy.device) for _ in regimes]
    rows = _block_rows(kg, dg)
    scratch = torch.empty((5, rows, dg), dtype=torch.float64, device=sxy.device)
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
            sums = ((sxy[gi, rs], sx_g), (spxy[gi, rs], spx[gi, rs]), (dxy, dx))
            for (s_xy, s_x), r, o in zip(sums, regimes, out):
                _cov_into(cov, tmp, s_xy, s_x, shift_g, r, gi, rs)
                _normalise_into(o[gi, rs], cov, tmp, wb, w_norm, r.alive[gi, rs])
    shape = layer.weight.shape
    n_pos = lm.field("pos_n")[slot]
    return apply_limits({
        "a_lin": out[0].reshape(shape),
        "a_pos": out[1].reshape(shape),
        "a_neg": out[2].reshape(shape),
        "n_pos": n_pos.clone(),
        "n": lm.count[slot].clone(),
    }, layer.weight, limits)
