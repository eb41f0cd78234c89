"""The blocked PyTorch pattern computation (``_reference.layer_patterns``, the fallback and the oracle of the
native op) gives exactly the numbers of the whole-layer formulas (bit for bit)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from untangle_ext import _reference, ops
from untangle_ext.moments import LayerMoments, Moments
from untangle_ext.patterns import compute_patterns
from untangle_ext.trace import Program

_DEAD = 1e-12


# --- oracle: the whole-layer implementation as it was before blocking (kept here only) ---
def _oracle_normalise(cov, w, alive):
    den = (w * cov).sum(1)
    scale = w.norm(dim=1) * cov.norm(dim=1)
    ok = alive & torch.isfinite(den) & (den.abs() > _DEAD * scale) & (den != 0)
    safe = torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok.unsqueeze(1), cov / safe.unsqueeze(1), torch.zeros_like(cov))


def _oracle_regime_cov(sxy, sx, sy, n, ey_all, shift, mean_y):
    n_ = n.clamp(min=1).unsqueeze(1)
    ex = sx / n_
    ey = sy / n.clamp(min=1)
    if mean_y == "positive":
        return sxy / n_ - ex * ey.unsqueeze(1)
    return sxy / n_ - ex * ey_all.unsqueeze(1) + shift * (ey - ey_all).unsqueeze(1)


def _oracle(lm: LayerMoments, slot: int, mean_y: str) -> dict[str, torch.Tensor]:
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
    cov_pos = _oracle_regime_cov(spxy, spx, pos_sum_y, n_pos, ey_all, shift, mean_y)
    cov_neg = _oracle_regime_cov(sxy - spxy, sx - spx, sum_y - pos_sum_y, n_neg, ey_all, shift, mean_y)
    shape = layer.weight.shape
    return {"a_lin": _oracle_normalise(cov, w, n > 1).reshape(shape),
            "a_pos": _oracle_normalise(cov_pos, w, n_pos > 0).reshape(shape),
            "a_neg": _oracle_normalise(cov_neg, w, n_neg > 0).reshape(shape),
            "n_pos": n_pos, "n": lm.count[slot]}


MODELS = {
    "linear": (lambda: nn.Sequential(nn.Linear(37, 21), nn.ReLU(), nn.Linear(21, 1)), (37,)),
    "conv_groups": (lambda: nn.Sequential(nn.Conv2d(4, 12, 3, padding=1, groups=2), nn.ReLU(),
                                          nn.Conv2d(12, 6, 2, groups=3)), (4, 7, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 5, 3)), (3, 11)),
}


def _moments(name: str, slots: int = 2) -> tuple[Program, Moments]:
    build, shape = MODELS[name]
    torch.manual_seed(7)
    model = build()
    with torch.no_grad():  # a dead neuron (zero weights) and a neuron that is always positive
        model[0].weight[1].zero_()
        model[0].bias[2] = 50.0
    program = Program(model)
    moments = Moments(program, slots)
    for b in range(4):
        x = torch.randn(9, *shape) + 0.3
        moments.update(x, torch.tensor([i % slots for i in range(9)]))
    return program, moments


@pytest.mark.parametrize("block", [1, 100, _reference.BLOCK_ELEMENTS])
@pytest.mark.parametrize("mean_y", ["all", "positive"])
@pytest.mark.parametrize("name", list(MODELS))
def test_blocked_patterns_bit_identical_to_whole_layer_formulas(name, mean_y, block, monkeypatch):
    monkeypatch.setattr(ops, "layer_patterns", _reference.layer_patterns)  # the PyTorch code on every backend
    monkeypatch.setattr(_reference, "BLOCK_ELEMENTS", block)  # 1: one row per thread; 100: a few rows
    program, moments = _moments(name)
    for lm in moments.layers.values():
        for slot in range(moments.num_slots):
            want = _oracle(lm, slot, mean_y)
            got = compute_patterns(lm, slot, mean_y)
            got32 = compute_patterns(lm, slot, mean_y, dtype=torch.float32)
            for key in want:
                assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
                assert torch.equal(got[key], want[key]), f"{lm.layer.name} slot {slot} {key} differs"
                if key.startswith("a_"):
                    assert got32[key].dtype == torch.float32
                    assert torch.equal(got32[key], want[key].float()), f"{key} float32 differs"
            nonzero = [bool(want[k].abs().sum() > 0) for k in ("a_lin", "a_pos", "a_neg")]
            assert nonzero[0] and nonzero[1]  # the comparison is not between two zero tensors


def test_dead_and_one_regime_neurons_get_zero_patterns():
    _, moments = _moments("linear", slots=1)
    p = compute_patterns(next(iter(moments.layers.values())), 0)
    assert torch.equal(p["a_lin"][1], torch.zeros(37, dtype=torch.float64))  # zero weights
    assert torch.equal(p["a_neg"][2], torch.zeros(37, dtype=torch.float64))  # never negative
    assert p["n_pos"][2] == p["n"]
