"""The numbers of the report, from predicted probabilities and labels alone (no model here).

Uncertainty is ranked by the margin between the top two probabilities (small = unsure) or by the
entropy of the softmax (large = unsure); calibration is the reliability diagram over equal-width
confidence bins and its expected calibration error, ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b|.
"""
from __future__ import annotations

from typing import Optional

import torch

UNCERTAINTY = ("margin", "entropy")


def check_uncertainty(by: str) -> str:
    """Validate the uncertainty measure's name."""
    if by not in UNCERTAINTY:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTY} ('margin': p(top) - p(runner-up), small = "
                         f"unsure; 'entropy': -sum p log p, large = unsure), not {by!r}")
    return by


def margin(probs: torch.Tensor) -> torch.Tensor:
    """p(top class) − p(runner-up) per row of (B, K) probabilities; needs K ≥ 2."""
    top2 = probs.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) per row of (B, K) probabilities; 0·log 0 counts as 0."""
    p = probs.double()
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(1)


def uncertainty(probs: torch.Tensor, by: str = "margin") -> torch.Tensor:
    """A score per row, larger = more uncertain: −margin or entropy."""
    return -margin(probs).double() if check_uncertainty(by) == "margin" else entropy(probs)


def _top(score: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of the ``n`` largest scores, largest first; ties go to the lower position."""
    order = torch.sort(score, descending=True, stable=True).indices
    return order[:n]


def select(probs: torch.Tensor, labels: torch.Tensor, n: int, by: str = "margin") -> tuple[torch.Tensor, torch.Tensor]:
    """(the ``n`` most uncertain rows, most uncertain first; the ``n`` most confident wrong ones, most confident first).

    Positions index the rows of ``probs``; ties go to the lower position, so the choice is deterministic.
    """
    wrong = torch.nonzero(probs.argmax(1) != labels).flatten()
    confident_wrong = wrong[_top(probs[wrong].max(1).values.double(), n)]
    return _top(uncertainty(probs, by), n), confident_wrong


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 10) -> dict:
    """Reliability diagram over ``bins`` equal-width confidence bins ((lo, hi], the first one also holds 0) and ECE.

    Empty bins have count 0 and ``None`` for their accuracy and mean confidence.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if confidence.numel() == 0:
        raise ValueError("calibration needs at least one prediction")
    conf = confidence.double().cpu()
    ok = correct.double().cpu()
    which = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(which, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, conf)
    ok_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, ok)
    filled = count > 0
    acc = torch.where(filled, ok_sum / count.clamp(min=1), torch.zeros_like(ok_sum))
    mean_conf = torch.where(filled, conf_sum / count.clamp(min=1), torch.zeros_like(conf_sum))
    ece = float(((count / conf.numel()) * (acc - mean_conf).abs()).sum())
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    return {
        "edges": edges.tolist(),
        "count": count.tolist(),
        "accuracy": [float(a) if f else None for a, f in zip(acc, filled)],
        "confidence": [float(c) if f else None for c, f in zip(mean_conf, filled)],
        "ece": ece,
    }


def confusion_pairs(probs: torch.Tensor, labels: torch.Tensor, top: Optional[int] = 10) -> list[dict]:
    """Unordered pairs {top class, runner-up} of the given rows, most frequent first (ties: smaller pair first).

    Each entry: the pair, how many rows it holds, their share, and how many of them the model got wrong.
    """
    top2 = probs.topk(2, dim=1).indices.cpu()
    pairs = torch.sort(top2, dim=1).values
    wrong = (top2[:, 0] != labels.cpu()).long()
    counts: dict[tuple[int, int], list[int]] = {}
    for (a, b), w in zip(pairs.tolist(), wrong.tolist()):
        entry = counts.setdefault((a, b), [0, 0])
        entry[0] += 1
        entry[1] += w
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
    total = max(1, pairs.shape[0])
    return [{"pair": list(pair), "count": n, "share": n / total, "wrong": w} for pair, (n, w) in ranked]
