"""model_fingerprint is hashed once per weight state, and any change of the weights is noticed."""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from untangle_ext import store
from untangle_ext.store import model_fingerprint


def _uncached(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(300, 20), nn.BatchNorm1d(20), nn.Linear(20, 3))


def test_fingerprint_hashes_once_and_equals_the_full_hash(monkeypatch):
    model = _model()
    want = _uncached(model)
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(store.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    first = model_fingerprint(model)
    assert first == want
    for _ in range(3):
        assert model_fingerprint(model) == first
    assert len(calls) == 1


def test_every_kind_of_weight_change_is_noticed():
    model = _model()
    seen = {model_fingerprint(model)}
    edits = [
        lambda m: m[0].weight.mul_(2),                                    # in place (version counter)
        lambda m: m.load_state_dict({k: v + 1 for k, v in m.state_dict().items()}),
        lambda m: m[0].weight.data.copy_(torch.randn(20, 300)),           # bypasses the version counter
        lambda m: m[0].weight.data.numpy()[::5] .__imul__(0.5),           # numpy view, no version counter
        lambda m: setattr(m[2], "weight", nn.Parameter(torch.randn(3, 20))),  # a new tensor
        lambda m: m[1].running_mean.add_(1),                              # a buffer
    ]
    for edit in edits:
        with torch.no_grad():
            edit(model)
        fp = model_fingerprint(model)
        assert fp == _uncached(model)
        assert fp not in seen
        seen.add(fp)
