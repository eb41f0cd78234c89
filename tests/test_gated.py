"""estimator="gated": a⁺ only where a layer's output is split by sign downstream, a elsewhere (issue 11).

The oracle does not use the engine's choice: it rebuilds the stores with ``a_pos`` replaced by
``a_lin`` on the layers a reader of the model can name by hand, and reverses them with "positive".
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_engine_attribution import SmallVGG, _model, _random_stores
from untangle_ext import Attributor, SignalStore
from untangle_ext.models import LeNet, residual_net, vgg_style_net
from untangle_ext.store import PATTERN_KEYS, StoreKeyError, class_store_path
from untangle_ext.trace import Program

#: residual_net's layers whose own sign gates nothing: each block's second conv (its ReLU follows the
#: addition) and the projection shortcut.
RESIDUAL_UNGATED = {"3.conv2", "4.conv2", "4.downsample.0"}


class Mixed(nn.Module):
    """One conv per case: sigmoid, max-pool then ReLU, GELU, ReLU and an addition, concatenation then ReLU."""

    def __init__(self):
        super().__init__()
        self.sig, self.pooled, self.gelu, self.both, self.cat = (nn.Conv2d(2, 2, 3, padding=1) for _ in range(5))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        a = torch.sigmoid(self.sig(x))
        b = F.relu(self.pool(self.pooled(x)))
        c = F.gelu(self.gelu(x))
        d = self.both(x)
        d = F.relu(d) + d
        e = F.relu(torch.cat([self.cat(x), x], 1))[:, :2]
        h = F.max_pool2d(a + c + d + e, 2) + b
        return self.head(F.adaptive_avg_pool2d(h, 2).flatten(1))


@pytest.mark.parametrize("factory, ungated", [
    (LeNet, set()), (vgg_style_net, set()), (SmallVGG, set()), (residual_net, RESIDUAL_UNGATED),
    (Mixed, {"sig", "both", "cat"}),
])
def test_sign_gated_layers(factory, ungated):
    program = Program(factory().eval())
    names = {layer.name for layer in program.layers}
    assert program.sign_gated == frozenset(names - ungated)


def _replace_ungated(stores: dict[int, SignalStore], ungated: set[str]) -> dict[int, SignalStore]:
    """The stores with a_pos := a_lin on the ``ungated`` layers (what "gated" must reverse through)."""
    out = {}
    for c, s in stores.items():
        patterns = {name: {**p, "a_pos": p["a_lin"] if name in ungated else p["a_pos"]}
                    for name, p in s.patterns.items()}
        out[c] = dataclasses.replace(s, patterns=patterns)
    return out


@pytest.mark.parametrize("method", ["pattern_attribution", "patternnet"])
def test_gated_reverses_each_layer_through_its_pattern(method):
    model, shape = _model("residual_bn")
    stores = _random_stores(model, range(10))
    x = torch.randn(3, *shape, dtype=torch.float64)
    got = Attributor(model, stores).explain(x, topk=3, method=method, estimator="gated")
    want = Attributor(model, _replace_ungated(stores, RESIDUAL_UNGATED)).explain(x, topk=3, method=method)
    torch.testing.assert_close(got.attributions, want.attributions, rtol=1e-12, atol=0)
    positive = Attributor(model, stores).explain(x, topk=3, method=method)
    assert not torch.allclose(got.attributions, positive.attributions)  # the choice matters here


def test_gated_equals_positive_where_every_layer_is_gated():
    model, shape = _model("lenet")
    attributor = Attributor(model, _random_stores(model, range(10)))
    x = torch.randn(2, *shape, dtype=torch.float64)
    assert torch.equal(attributor.attribute(x, topk=2, estimator="gated"), attributor.attribute(x, topk=2))


def test_lazy_gated_reads_both_patterns_and_names_a_missing_one(tmp_path):
    model, shape = _model("residual_bn")
    stores = _random_stores(model, range(10))
    for c, s in stores.items():
        s.save(class_store_path(tmp_path / "all", c), dtype=torch.float64, keep=PATTERN_KEYS)
        s.save(class_store_path(tmp_path / "pos", c), dtype=torch.float64)  # default keep: a_pos only
    x = torch.randn(2, *shape, dtype=torch.float64)
    lazy = Attributor.from_prefix(model, tmp_path / "all", estimator="gated")
    assert lazy.lazy.keys == ("a_lin", "a_pos")
    torch.testing.assert_close(lazy.attribute(x, topk=2, estimator="gated"),
                               Attributor(model, stores).attribute(x, topk=2, estimator="gated"), rtol=1e-12, atol=0)
    with pytest.raises(StoreKeyError, match="a_lin"):
        Attributor.from_prefix(model, tmp_path / "pos", estimator="gated").attribute(x, estimator="gated")


def test_unknown_estimator_is_named():
    model, shape = _model("lenet")
    with pytest.raises(ValueError, match="'positive', 'linear', 'gated'"):
        Attributor(model, _random_stores(model, [0])).attribute(torch.randn(1, *shape, dtype=torch.float64),
                                                               target=0, estimator="relu")
