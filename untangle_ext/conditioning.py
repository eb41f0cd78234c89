"""Conditioning of patterns: κ = ‖a‖·‖w‖ per neuron, the limits that mark a neuron dead, and summaries.

Every live pattern satisfies ``wᵀa = 1``, so ``κ = ‖a‖·‖w‖ = 1 / |cos(a, w)| ≥ 1`` (= 1 when
``a ∥ w``). A large κ means ``wᵀ cov`` is tiny against ``‖w‖·‖cov‖``: the pattern is a large
vector fixed by a nearly-cancelling denominator, and a few such neurons can dominate a
reverse pass. :class:`Limits` says when such a neuron (or one whose regime saw too few
samples) is treated as dead (pattern 0). Stores record κ *before* the limits
(``kappa_lin`` / ``kappa_pos`` / ``kappa_neg``, 0 where no pattern is defined) so that
``untangle-ext inspect`` can show what the limits removed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch

if TYPE_CHECKING:
    from .store import SignalStore

#: Which count each estimator's regime holds: all samples, the positive regime, the negative regime.
ESTIMATORS = {"a_lin": "lin", "a_pos": "pos", "a_neg": "neg"}
KAPPA_KEYS = tuple(f"kappa_{s}" for s in ESTIMATORS.values())


@dataclass(frozen=True)
class Limits:
    """When a neuron's pattern is treated as dead (zero).

    ``kappa_max``: largest κ = ‖a‖·‖w‖ kept (κ = 1/|cos(a, w)|; default 1e6: a pattern within
    1e-6 rad of orthogonal to its weight). ``min_samples``: fewest samples its regime must hold
    (a_lin: all samples, a⁺/a⁻: the regime's; default 1: any non-empty regime, since eq. 8 is
    defined from one sample; 2 changed an untrained LeNet's maps by 1.7%).
    The defaults leave the tutorial LeNet's maps unchanged (≤ 1e-3; tests/test_conditioning.py).
    """

    kappa_max: float = 1e6
    min_samples: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.kappa_max, bool) or not isinstance(self.kappa_max, (int, float)) \
                or not 1 <= self.kappa_max < math.inf:
            raise ValueError(f"kappa_max must be a finite number >= 1 (κ of any pattern is >= 1), not {self.kappa_max!r}")
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int) or self.min_samples < 1:
            raise ValueError(f"min_samples must be an int >= 1, not {self.min_samples!r}")

    def options(self) -> dict[str, Any]:
        """As stored in a store's ``estimator`` options."""
        return {"kappa_max": float(self.kappa_max), "min_samples": self.min_samples}

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Optional["Limits"]:
        """The limits a store was estimated with; None for stores written before limits existed."""
        if "kappa_max" not in options:
            return None
        return cls(float(options["kappa_max"]), int(options["min_samples"]))


def kappa(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """κ_k = ‖a_k‖·‖w_k‖ per neuron for patterns ``a`` and weights ``w`` (K, D), in float64 without a float64
    copy of either; 0 where a_k = 0."""
    norm = lambda t: torch.linalg.vector_norm(t, dim=1, dtype=torch.float64)  # noqa: E731
    return norm(a) * norm(w)


def apply_limits(patterns: dict[str, torch.Tensor], weight: torch.Tensor, limits: Limits,
                 kappas: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Add ``kappa_*`` (K,) to ``patterns`` (fresh tensors from :func:`patterns.compute_patterns`, zeroed in place)
    and zero the neurons beyond ``limits``; patterns are shaped like ``weight``, counts ``n_pos`` (K,) and ``n`` ().

    ``kappas`` (3, K): κ of a_lin, a_pos, a_neg when the caller has them (the pattern op computes them
    in its pass, also of patterns it did not keep); otherwise they are computed here, one more read of
    the patterns, and every pattern must be present. Only the rows of dead neurons are written.
    """
    k = weight.shape[0]
    w = weight.reshape(k, -1)
    n_pos, n = patterns["n_pos"].double(), patterns["n"].double().expand(k)
    counts = {"lin": n, "pos": n_pos, "neg": n - n_pos}
    out = dict(patterns)
    for i, (key, regime) in enumerate(ESTIMATORS.items()):
        kap = kappa(patterns[key].reshape(k, -1), w) if kappas is None else kappas[i]
        if key in patterns:
            dead = (kap > limits.kappa_max) | (counts[regime] < limits.min_samples)
            patterns[key].reshape(k, -1).index_fill_(0, dead.nonzero().flatten(), 0)
        out[f"kappa_{regime}"] = kap.to(torch.float32)
    return out


@dataclass
class LayerStats:
    """One row of the conditioning table (one layer, one estimator of one store)."""

    layer: str
    neurons: int
    dead: int  # pattern zero (no samples, no covariance, or beyond the limits)
    ill: Optional[int]  # defined, but κ > kappa_max (None: unknown, store without κ)
    kappa_median: Optional[float]  # over the neurons with a defined pattern
    kappa_max: Optional[float]
    samples: int  # n: samples (positions) seen
    regime_median: float  # median per-neuron count of the estimator's regime
    few: Optional[int]  # neurons whose regime holds fewer than min_samples


def layer_stats(store: "SignalStore", estimator: str = "a_pos") -> list[LayerStats]:
    """Per-layer conditioning statistics of one estimator (``a_lin``, ``a_pos`` or ``a_neg``)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, not {estimator!r}")
    regime = ESTIMATORS[estimator]
    limits = Limits.from_options(store.estimator)
    rows = []
    for name, p in store.patterns.items():
        a = p[estimator].reshape(p[estimator].shape[0], -1)
        k = a.shape[0]
        n = float(p["n"])
        counts = {"lin": torch.full((k,), n, dtype=torch.float64), "pos": p["n_pos"], "neg": n - p["n_pos"]}[regime]
        kap = p.get(f"kappa_{regime}")
        defined = kap[kap > 0] if kap is not None else None
        rows.append(LayerStats(
            layer=name, neurons=k, dead=int((a == 0).all(1).sum()),
            ill=None if kap is None or limits is None else int((kap > limits.kappa_max).sum()),
            kappa_median=float(defined.median()) if defined is not None and defined.numel() else None,
            kappa_max=float(defined.max()) if defined is not None and defined.numel() else None,
            samples=int(n), regime_median=float(counts.double().median()),
            few=None if limits is None else int((counts < limits.min_samples).sum())))
    return rows


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def table(store: "SignalStore", estimator: str = "a_pos") -> str:
    """The per-layer table ``untangle-ext inspect`` prints."""
    head = ("layer", "neurons", "dead", "ill-cond.", "median κ", "max κ", "samples", "median in regime", "too few")
    body = [(s.layer, str(s.neurons), str(s.dead), _fmt(s.ill), _fmt(s.kappa_median), _fmt(s.kappa_max),
             str(s.samples), _fmt(s.regime_median), _fmt(s.few)) for s in layer_stats(store, estimator)]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *body]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def summary(store: "SignalStore") -> str:
    """One line: neurons, dead and ill-conditioned counts (a⁺), and the largest κ."""
    stats = layer_stats(store, "a_pos")
    neurons, dead = sum(s.neurons for s in stats), sum(s.dead for s in stats)
    kmax = [s.kappa_max for s in stats if s.kappa_max is not None]
    ill = [s.ill for s in stats if s.ill is not None]
    cond = (f", {sum(ill)} ill-conditioned, max κ {_fmt(max(kmax))}" if ill and kmax
            else ", κ not recorded (store from an older version)")
    return f"{len(stats)} layers, {neurons} neurons (a⁺): {dead} dead{cond}"
