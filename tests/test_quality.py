"""Known-answer tests of the quality metrics: ρ(S) (toy example, float64 oracle) and degradation curves."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from untangle_ext import SignalEstimator, StoreError
from untangle_ext.quality import (area_under_curve, degradation_curve, neuron_rho, patch_scores, score_maps,
                                  signal_directions, signal_quality)
from untangle_ext.quality.rho import layer_inputs
from untangle_ext.store import ALL_CLASSES
from untangle_ext.trace import Program


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


# ---------------------------------------------------------------- ρ(S)

def _toy_split(n: int, seed: int) -> torch.Tensor:
    """x = a_s y + a_d ε with ε exactly uncorrelated with y and both of unit variance in this sample."""
    g = torch.Generator().manual_seed(seed)
    y, eps = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    y = y - y.mean()
    eps = eps - eps.mean()
    eps = eps - (eps @ y) / (y @ y) * y
    y, eps = y / y.std(), eps / eps.std()
    return torch.stack([y + eps, eps], 1)  # a_s = (1, 0), a_d = (1, 1)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0]]))
    x_a = _toy_split(4000, 1)
    store = SignalEstimator(model, per_class=False, store_dtype=torch.float64, progress=False).fit(
        [(x_a, torch.zeros(len(x_a), dtype=torch.long))])[ALL_CLASSES]
    return model, store


def test_toy_patterns_are_the_papers(toy):
    _, store = toy
    assert torch.allclose(store.patterns["0"]["a_lin"].double(), torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                          atol=1e-9)


def test_toy_rho_signal_estimator_is_perfect_and_gradient_is_not(toy):
    model, store = toy
    before = _state(model)
    rho = signal_quality(model, store, _toy_split(3000, 2), _toy_split(3000, 3), progress=False)["0"]
    assert rho["S_a"]["rho"] == pytest.approx(1.0, abs=1e-6)
    # S_w leaves (y/2 + ε)(1, 1) in the distractor: corr(y, y/2 + ε) = 1/√5 exactly on this sample.
    assert rho["S_w"]["rho"] == pytest.approx(1.0 - 1.0 / math.sqrt(5.0), abs=1e-6)
    assert rho["S_w"]["rho"] < 0.6
    assert all(v["neurons"] == 1 and v["skipped"] == 0 for v in rho.values())
    _assert_unchanged(model, before)


def _explicit_rho(x_fit, x_eval, w, b, s_pos, s_neg):
    """float64 oracle: build the distractor matrix, numpy lstsq with intercept, Pearson correlation."""
    out = []
    for k in range(w.shape[0]):
        def distractor(x):
            y = x @ w[k]
            gate = (y + b[k]) > 0
            s = np.where(gate[:, None], s_pos[k], s_neg[k])
            return x - y[:, None] * s, y
        d, y = distractor(x_fit)
        design = np.hstack([d, np.ones((len(d), 1))])
        coef = np.linalg.lstsq(design, y, rcond=None)[0]
        d_e, y_e = distractor(x_eval)
        out.append(1.0 - np.corrcoef(y_e, d_e @ coef[:-1])[0, 1])
    return np.array(out)


def test_neuron_rho_matches_explicit_least_squares():
    rng = np.random.default_rng(0)
    k, d = 5, 7
    mix = rng.normal(size=(d, d))
    x_fit, x_eval = rng.normal(size=(400, d)) @ mix + 2.0, rng.normal(size=(300, d)) @ mix + 2.0
    w, b = rng.normal(size=(k, d)), rng.normal(size=k)
    s_pos, s_neg = rng.normal(size=(k, d)) * 0.3, rng.normal(size=(k, d)) * 0.3
    t = torch.from_numpy
    got = neuron_rho(t(x_fit), t(x_eval), t(w), t(b), t(s_pos), t(s_neg), ridge=0.0, chunk=2).numpy()
    np.testing.assert_allclose(got, _explicit_rho(x_fit, x_eval, w, b, s_pos, s_neg), rtol=0, atol=1e-9)


def test_neuron_rho_singular_rank_one_distractor_without_ridge():
    """S_w's distractor is always orthogonal to w: with ridge=0 the singular system falls back to lstsq."""
    rng = np.random.default_rng(1)
    x_fit, x_eval = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 4)), rng.normal(size=(200, 4))
    w, b = rng.normal(size=(2, 4)), np.zeros(2)
    s = w / (w * w).sum(1, keepdims=True)
    t = torch.from_numpy
    got = neuron_rho(t(x_fit), t(x_eval), t(w), t(b), t(s), t(s), ridge=0.0).numpy()
    np.testing.assert_allclose(got, _explicit_rho(x_fit, x_eval, w, b, s, s), rtol=0, atol=1e-8)


def test_neuron_rho_constant_output_is_skipped_and_missing_distractor_is_perfect():
    x = torch.randn(200, 3, dtype=torch.float64)
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    x[:, 1:] = 0.0  # neuron 1: the distractor x - y·e1 is identically zero
    rho = neuron_rho(x[:100], x[100:], w, torch.zeros(2, dtype=torch.float64), s, s)
    assert math.isnan(rho[0]) and rho[1] == pytest.approx(1.0)


def test_rank_one_directions_reproduce_the_output():
    layer = Program(nn.Sequential(nn.Linear(6, 4))).layers[0]
    for est in ("random", "S_w"):
        s, s_neg = signal_directions(layer, {}, est, torch.Generator().manual_seed(0))
        assert s is s_neg
        assert torch.allclose((layer.weight.double() * s).sum(1), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown estimator"):
        signal_directions(layer, {}, "S_x")


def _small_convnet() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))


def test_conv_patch_rows_reproduce_the_layer_output():
    model = _small_convnet().eval()
    program = Program(model)
    x = torch.rand(5, 1, 8, 8)
    rows = layer_inputs(program, x, positions=1000, generator=torch.Generator().manual_seed(0))["0"]
    assert rows.shape == (5 * 36, 9)
    layer = program.layers[0]
    y = rows @ layer.weight.double().reshape(3, -1).T + layer.bias.double()
    expected = layer.forward(x).permute(0, 2, 3, 1).reshape(-1, 3).double()
    torch.testing.assert_close(y.sort(0).values, expected.sort(0).values, rtol=0, atol=1e-5)


def test_signal_quality_on_a_convnet_leaves_the_model_alone():
    model = _small_convnet().train()
    before = _state(model)
    x = torch.rand(300, 1, 8, 8)
    labels = torch.zeros(300, dtype=torch.long)
    store = SignalEstimator(model, per_class=False, progress=False).fit([(x[:100], labels[:100])])[ALL_CLASSES]
    rho = signal_quality(model, store, x[100:200], x[200:], max_neurons=2, positions=3, progress=False)
    assert set(rho) == {"0", "4"}
    assert all(v["neurons"] + v["skipped"] == 2 for layer in rho.values() for v in layer.values())
    assert all(math.isfinite(v["rho"]) for layer in rho.values() for v in layer.values())
    _assert_unchanged(model, before)
    assert model.training
    with pytest.raises(ValueError, match="unknown estimator"):
        signal_quality(model, store, x[:10], x[10:20], estimators=["S_x"], progress=False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[4].bias.add_(1.0)
    with pytest.raises(StoreError, match="different model weights"):
        signal_quality(other, store, x[:10], x[10:20], progress=False)


# ---------------------------------------------------------------- degradation

def test_area_under_curve_known_values():
    f = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert area_under_curve(f, torch.full((11,), 0.3, dtype=torch.float64)) == pytest.approx(0.3, abs=1e-15)
    assert area_under_curve(f, f) == pytest.approx(0.5, abs=1e-15)
    with pytest.raises(ValueError):
        area_under_curve(f[:1], f[:1])


def test_patch_scores_sum_each_square():
    a = torch.arange(2 * 2 * 4 * 4, dtype=torch.float64).view(2, 2, 4, 4)
    s = patch_scores(a, 2)
    assert s.shape == (2, 4)
    assert s[0, 1] == a[0, :, 0:2, 2:4].sum() and s[1, 2] == a[1, :, 2:4, 0:2].sum()
    with pytest.raises(ValueError, match="divide"):
        patch_scores(a, 3)


def _positive_linear(num_pixels: int = 64) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(num_pixels, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0] = torch.rand(num_pixels) + 0.1
        model[1].bias.zero_()
    return model


def test_curve_starts_at_the_models_probability_and_falls_monotonically():
    """Every pixel pushes class 0 up and lies above the fill: any order must lower p(class 0) step by step."""
    model = _positive_linear().eval()
    x = 0.2 + torch.rand(6, 1, 8, 8) * 0.8
    scores = torch.randn(6, 16)
    curve = degradation_curve(model, x, scores, patch=2, fill=0.1)
    p0 = torch.softmax(model(x).double(), 1)
    assert torch.allclose(curve.probabilities[0], p0.max(1).values)
    assert torch.equal(curve.counts, torch.arange(17)) and curve.fractions[-1] == 1.0
    assert (curve.probabilities.diff(dim=0) <= 1e-12).all()
    full = torch.softmax(model(torch.full_like(x, 0.1)).double(), 1).gather(1, curve.predicted.view(-1, 1))
    assert torch.allclose(curve.probabilities[-1], full.squeeze(1))
    fewer = degradation_curve(model, x, scores, patch=2, fill=0.1, points=5)
    assert torch.equal(fewer.counts, torch.tensor([0, 4, 8, 12, 16]))
    assert torch.allclose(fewer.probabilities, curve.probabilities[fewer.counts])
    with pytest.raises(ValueError, match="scores must be"):
        degradation_curve(model, x, scores[:, :3], patch=2, fill=0.1)


def test_constant_model_gives_a_constant_curve_with_known_area():
    model = _positive_linear()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, 1.0]))
    curve = degradation_curve(model, torch.rand(3, 1, 8, 8), torch.rand(3, 4), patch=4, fill=0.5)
    p = 1.0 / (1.0 + math.exp(-1.0))
    assert curve.auc == pytest.approx(p, abs=1e-7)


def _irrelevant_right_half():
    """Positive two-layer net that ignores the right half of 8x8 images (zero weights there)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 2))
    left = torch.zeros(1, 8, 8, dtype=torch.bool)
    left[..., :4] = True
    with torch.no_grad():
        model[1].weight.copy_((torch.rand(6, 64) + 0.1) * left.view(1, -1))
        model[3].weight.copy_(torch.rand(2, 6) + 0.1)
        model[1].bias.zero_()
        model[3].bias.copy_(torch.tensor([0.0, -2.0]))

    def images(n: int, right) -> torch.Tensor:
        t = 0.2 + 0.8 * torch.rand(n, 1, 1, 1)
        u = 0.5 + 0.5 * torch.rand(1, 1, 8, 8)
        x = u * t + 0.05 * torch.rand(n, 1, 8, 8)
        return torch.where(left, x, right(n))

    fit = images(600, lambda n: torch.full((n, 1, 8, 8), 0.5))  # constant: no covariance with anything
    explain = images(20, lambda n: torch.rand(n, 1, 8, 8))
    return model.eval(), fit, explain


def test_provably_irrelevant_region_is_degraded_last_by_every_method():
    model, fit, explain = _irrelevant_right_half()
    before = _state(model)
    labels = model(fit).argmax(1)
    stores = SignalEstimator(model, progress=False).fit([(fit, labels)])
    maps = score_maps(model, stores, explain)
    assert set(maps) == {"pattern_attribution", "pattern_attribution_linear", "patternnet", "gradient",
                         "input_x_gradient", "random"}
    for name, m in maps.items():
        if name == "random":
            continue
        scores = patch_scores(m, 4)  # patches 0, 2 = left half; 1, 3 = right half
        relevant, irrelevant = scores[:, [0, 2]], scores[:, [1, 3]]
        assert (relevant.min(1).values > irrelevant.max(1).values).all(), name
        curve = degradation_curve(model, explain, scores, patch=4, fill=0.3)
        # once the relevant half is gone, replacing the irrelevant half changes nothing
        assert torch.equal(curve.probabilities[2], curve.probabilities[3]), name
        assert torch.equal(curve.probabilities[2], curve.probabilities[4]), name
    _assert_unchanged(model, before)


def test_score_maps_rejects_unknown_ranking():
    model, fit, explain = _irrelevant_right_half()
    with pytest.raises(ValueError, match="unknown ranking"):
        score_maps(model, None, explain, rankings=("lrp",))


def test_quality_job_writes_figures_and_json(tmp_path, monkeypatch):
    """The job end to end on a small slice of the sample and an untrained LeNet (the real run takes minutes)."""
    import json

    from untangle_ext.data import load_mnist_sample
    from untangle_ext.models import LeNet
    from untangle_ext.quality import report

    torch.manual_seed(0)
    model = LeNet().eval()
    before = _state(model)
    monkeypatch.setattr(report, "load_or_train_lenet", lambda cache, **kw: (model, 0.1))
    monkeypatch.setattr(report, "load_mnist_sample",
                        lambda split: tuple(t[::20] for t in load_mnist_sample(split)))
    result = report.run_quality(out=tmp_path / "q", images=2, patch=7, deletion_points=3, max_neurons=2,
                                positions=1, progress=False)
    files = {p.name: p for p in (tmp_path / "q").iterdir()}
    assert set(files) == {"rho.png", "degradation.png", "quality.json"}
    assert all(p.stat().st_mode & 0o044 for p in files.values())  # not left at mkstemp's 0600
    saved = json.loads(files["quality.json"].read_text())
    assert saved["auc"] == result["auc"] and set(saved["rho"]) == {"features.0", "features.3", "classifier.0",
                                                                   "classifier.2"}
    assert len(saved["curves"]["deletion"]["random"]["fractions"]) == 3
    _assert_unchanged(model, before)
