"""Float64 brute-force oracles: patches by explicit loops, patterns by two-pass statistics.

Written independently of the engine (no convolution calls, no shifted sums) so
that the engine's tests compare against first principles.
"""
from __future__ import annotations

import itertools
import math

import torch


def conv_patches(x: torch.Tensor, kernel, stride, padding, dilation, groups: int) -> torch.Tensor:
    """All input patches of a ConvNd (N = len(kernel)), by explicit loops: (N*prod(out), G, C/G*prod(kernel))."""
    x = x.double()
    n, c, *size = x.shape
    padded = torch.zeros(n, c, *[s + 2 * p for s, p in zip(size, padding)], dtype=torch.float64)
    padded[(slice(None), slice(None), *[slice(p, p + s) for s, p in zip(size, padding)])] = x
    out = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in zip(size, padding, dilation, kernel, stride)]
    rows = []
    for b in range(n):
        for pos in itertools.product(*[range(o) for o in out]):
            window = padded[(b, slice(None), *[slice(i * st, i * st + d * (k - 1) + 1, d)
                                               for i, st, d, k in zip(pos, stride, dilation, kernel)])]
            rows.append(window.reshape(groups, -1))
    return torch.stack(rows) if rows else torch.zeros(0, groups, c // groups * math.prod(kernel), dtype=torch.float64)


def _normalise(cov: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    den = cov @ w
    return cov / den if den.abs() > 1e-12 * (cov.norm() * w.norm()) else torch.zeros_like(cov)


def neuron_patterns(x: torch.Tensor, w: torch.Tensor, b: float, mean_y: str = "all") -> dict[str, torch.Tensor]:
    """Patterns of one neuron from its samples ``x`` (n, D) and weight ``w`` (D,), two-pass, float64."""
    x, w = x.double(), w.double()
    y = x @ w
    gate = (y + b) > 0
    ey = y.mean()
    cov = ((x - x.mean(0)) * (y - ey).unsqueeze(1)).mean(0)
    out = {"a_lin": _normalise(cov, w)}
    for key, mask in (("a_pos", gate), ("a_neg", ~gate)):
        if mask.sum() == 0:
            out[key] = torch.zeros_like(w)
            continue
        xs, ys = x[mask], y[mask]
        ex = xs.mean(0)
        centre = ys.mean() if mean_y == "positive" else ey
        # E_r[x y] - E_r[x] E[y], two-pass: E_r[(x - E_r x) y] + E_r[x] (E_r[y] - centre)
        c = ((xs - ex) * ys.unsqueeze(1)).mean(0) + ex * (ys.mean() - centre)
        out[key] = _normalise(c, w)
    return out


def layer_patterns(xg: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, mean_y: str = "all"):
    """Patterns of every neuron of a layer: ``xg`` (n, G, Dg) samples, ``weight`` (K, ...) -> dict of (K, ...)."""
    k = weight.shape[0]
    kg = k // groups
    w = weight.double().reshape(k, -1)
    result = {key: torch.zeros_like(w) for key in ("a_lin", "a_pos", "a_neg")}
    for neuron in range(k):
        p = neuron_patterns(xg[:, neuron // kg], w[neuron], float(bias[neuron]), mean_y)
        for key in result:
            result[key][neuron] = p[key]
    return {key: v.reshape(weight.shape) for key, v in result.items()}
