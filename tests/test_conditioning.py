"""Conditioning (issue 11): κ = ‖a‖·‖w‖, the limits that mark a neuron dead, store fields, summary, inspect."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from untangle_ext import ALL_CLASSES, Attributor, SignalEstimator
from untangle_ext.cli import main
from untangle_ext.conditioning import KAPPA_KEYS, Limits, apply_limits, layer_stats
from untangle_ext.data import load_mnist_sample
from untangle_ext.models import LeNet
from untangle_ext.store import SignalStore, StoreCorruptError


def _patterns(a: torch.Tensor, n_pos: list[float], n: float) -> dict[str, torch.Tensor]:
    return {"a_lin": a.clone(), "a_pos": a.clone(), "a_neg": a.clone(),
            "n_pos": torch.tensor(n_pos, dtype=torch.float64), "n": torch.tensor(n, dtype=torch.float64)}


def test_kappa_is_one_over_cosine_and_limits_zero_the_ill_conditioned():
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    # w·a = 1 for each: a ∥ w (κ = 1); a nearly ⟂ w (κ = sqrt(1 + 1e14) ≈ 1e7); a ∥ w, scaled (κ = 1)
    a = torch.tensor([[1.0, 0.0], [1.0, 1e7], [0.0, 0.5]], dtype=torch.float64)
    out = apply_limits(_patterns(a, [5, 5, 1], 10), w, Limits(kappa_max=1e6, min_samples=2))
    torch.testing.assert_close(out["kappa_pos"], torch.tensor([1.0, 1e7, 1.0]), rtol=1e-6, atol=0)
    assert out["kappa_pos"].dtype == torch.float32
    assert torch.equal(out["a_lin"][0], a[0]) and torch.equal(out["a_lin"][2], a[2])
    assert not out["a_lin"][1].any()  # κ 1e7 > 1e6
    assert not out["a_pos"][2].any() and out["a_neg"][2].any()  # 1 positive sample < 2; 9 negative ones
    loose = apply_limits(_patterns(a, [5, 5, 1], 10), w, Limits(kappa_max=1e8, min_samples=1))
    assert all(torch.equal(loose[k], a) for k in ("a_lin", "a_pos", "a_neg"))


@pytest.mark.parametrize("bad", [{"kappa_max": 0.5}, {"kappa_max": float("inf")}, {"kappa_max": True},
                                 {"min_samples": 0}, {"min_samples": 2.0}])
def test_bad_limits_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Limits(**bad)


def _lenet_stores(model=None, **kw):
    torch.manual_seed(0)
    model = LeNet().eval() if model is None else model
    x, y = load_mnist_sample("train")
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:600]
    x, y = x[pick], y[pick]
    loader = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 600, 100)]
    return model, SignalEstimator(model, progress=False, **kw).fit(loader)


@pytest.fixture(scope="module")
def lenet_stores():
    return _lenet_stores()


def test_store_records_kappa_and_limits(lenet_stores, tmp_path):
    _, stores = lenet_stores
    store = stores[3]
    assert store.estimator["kappa_max"] == 1e6 and store.estimator["min_samples"] == 1
    for name, p in store.patterns.items():
        k = p["a_pos"].shape[0]
        for key in KAPPA_KEYS:
            assert p[key].shape == (k,) and p[key].dtype == torch.float32
        live = p["a_pos"].reshape(k, -1).abs().sum(1) > 0
        assert bool((p["kappa_pos"][live] >= 1 - 1e-4).all())  # κ = 1/|cos| >= 1 wherever a pattern lives
    loaded = SignalStore.load(store.save(tmp_path / "s.pt"))
    assert torch.equal(loaded.patterns["features.0"]["kappa_pos"], store.patterns["features.0"]["kappa_pos"])
    assert loaded.estimator == {**store.estimator, "store_dtype": "float16"}  # files hold float16 patterns by default


def test_default_limits_leave_lenet_maps_unchanged(trained_lenet):
    """The default limits change no map of the trained LeNet by more than 1e-3 (relative to its largest value)."""
    model, _ = trained_lenet
    _, stores = _lenet_stores(model)
    _, raw = _lenet_stores(model, kappa_max=1e300, min_samples=1)
    images = load_mnist_sample("test")[0][:40]
    for method in ("pattern_attribution", "patternnet"):
        a = Attributor(model, stores).attribute(images, method=method)
        b = Attributor(model, raw).attribute(images, method=method)
        err = ((a - b).abs().amax((1, 2, 3)) / b.abs().amax((1, 2, 3))).max()
        assert err <= 1e-3, (method, float(err))


def test_tight_limits_kill_neurons_and_are_counted(lenet_stores):
    _, stores = lenet_stores
    _, tight = _lenet_stores(kappa_max=1.5, min_samples=2)
    rows = {s.layer: s for s in layer_stats(tight[3], "a_pos")}
    base = {s.layer: s for s in layer_stats(stores[3], "a_pos")}
    for name, row in rows.items():
        kap = tight[3].patterns[name]["kappa_pos"]
        assert row.ill == int((kap > 1.5).sum()) and row.dead >= row.ill
        assert row.kappa_max == pytest.approx(float(kap.max()))
    assert sum(r.ill for r in rows.values()) > sum(r.ill for r in base.values())


def test_summary_and_repr_are_one_line(lenet_stores):
    _, stores = lenet_stores
    store = stores[3]
    stats = layer_stats(store, "a_pos")
    line = store.summary()
    assert "\n" not in repr(store) and line in repr(store)
    assert f"{sum(s.neurons for s in stats)} neurons" in line and f"{sum(s.dead for s in stats)} dead" in line
    assert "ill-conditioned" in line and "max κ" in line


def _old_store(store: SignalStore) -> SignalStore:
    """The same store as written before issue 11: no κ fields, no limits in the options."""
    old = copy.copy(store)
    old.patterns = {n: {k: v for k, v in p.items() if not k.startswith("kappa_")} for n, p in store.patterns.items()}
    old.estimator = {k: v for k, v in store.estimator.items() if k not in ("kappa_max", "min_samples")}
    return old


def test_inspect_prints_the_table(lenet_stores, tmp_path, capsys):
    _, stores = lenet_stores
    path = stores[3].save(tmp_path / "c3.pt")
    old = _old_store(stores[3]).save(tmp_path / "old.pt")
    assert main(["inspect", str(path), str(old)]) == 0
    out = capsys.readouterr().out
    new_part, old_part = out.split(str(old) + ":")
    for s in layer_stats(stores[3], "a_pos"):
        row = next(line.split() for line in new_part.splitlines() if line.startswith(s.layer + " "))
        assert row[1:4] == [str(s.neurons), str(s.dead), str(s.ill)]
        assert float(row[5]) == pytest.approx(s.kappa_max, rel=1e-2) and row[6] == str(s.samples)
    assert "κ not recorded" in old_part and "none recorded" in old_part
    row = next(line.split() for line in old_part.splitlines() if line.startswith("features.0 "))
    assert row[3:6] == ["-", "-", "-"]


def test_inspect_reports_a_bad_file(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a store")
    with pytest.raises(SystemExit, match="untangle-ext inspect: error"):
        main(["inspect", str(bad)])


@pytest.mark.parametrize("edit,field", [
    (lambda d: d["patterns"]["0"].__setitem__("kappa_pos", -torch.ones(3)), "kappa_pos"),
    (lambda d: d["patterns"]["0"].__setitem__("kappa_pos", torch.ones(4)), "kappa_pos"),
    (lambda d: d["estimator"].pop("min_samples"), "estimator"),
    (lambda d: d["estimator"].__setitem__("kappa_max", 0.5), "kappa_max"),
])
def test_store_validation_of_the_new_fields(edit, field, tmp_path):
    lin = nn.Linear(4, 3)
    x = torch.randn(50, 4)
    store = SignalEstimator(lin, per_class=False, progress=False).fit([(x, torch.zeros(50, dtype=torch.long))])
    data = store[ALL_CLASSES].to_dict()
    edit(data)
    path = tmp_path / "s.pt"
    torch.save(data, path)
    with pytest.raises(StoreCorruptError, match=field):
        SignalStore.load(path)
