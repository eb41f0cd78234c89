"""Position subsampling of conv statistics (issue 15 item 6) against explicit float64 oracles."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from oracle import conv_patches, layer_patterns
from untangle_ext import SignalEstimator, SignalStore
from untangle_ext.moments import Moments
from untangle_ext.subsample import PositionSampler, check_rate
from untangle_ext.trace import Program

CASES = [  # (conv module, input size per image)
    (nn.Conv1d(3, 4, 5, stride=2, padding=2), (3, 23)),
    (nn.Conv1d(4, 6, 3, padding=3, dilation=2, groups=2), (4, 15)),
    (nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2), (3, 13, 11)),
    (nn.Conv2d(6, 6, 3, padding=1, groups=3), (6, 9, 9)),
    (nn.Conv3d(2, 3, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 1)), (2, 5, 7, 3)),
    (nn.Conv3d(4, 4, 3, stride=2, padding=1, dilation=(1, 2, 1), groups=4), (4, 5, 9, 5)),
]


def _loader(x, labels, batch):
    return [(x[i:i + batch], labels[i:i + batch]) for i in range(0, len(x), batch)]


def _fit(model, x, labels, batch=4, **kw):
    return SignalEstimator(model, progress=False, store_dtype=torch.float64, **kw).fit(_loader(x, labels, batch))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def _selected_patches(conv: nn.Module, x: torch.Tensor, sampler: PositionSampler, layer_index: int,
                      images: torch.Tensor) -> torch.Tensor:
    """The oracle's samples: every patch of the layer input ``x`` by explicit loops, then the rows the sampler
    names for the network inputs ``images``, (n, G, Dg)."""
    xg = conv_patches(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
    per_image = xg.view(x.shape[0], -1, *xg.shape[1:])
    index = sampler.select(sampler.image_keys(images), layer_index, per_image.shape[1])
    assert index.shape[1] == sampler.take(per_image.shape[1]) < per_image.shape[1]  # a real subset
    return per_image[torch.arange(x.shape[0]).unsqueeze(1), index].reshape(-1, *xg.shape[1:])


@pytest.mark.parametrize("case", range(len(CASES)))
def test_subsampled_patterns_equal_the_oracle_on_the_same_positions(case):
    module, size = CASES[case]
    torch.manual_seed(case)
    conv = module.double()
    x = torch.randn(11, *size, dtype=torch.float64) + 0.4
    labels = torch.tensor([0, 1] * 5 + [0])
    sampler = PositionSampler(0.3, seed=7)
    stores = _fit(conv, x, labels, classes=[0, 1], position_rate=0.3, position_seed=7)
    for c in (0, 1):
        rows = _selected_patches(conv, x[labels == c], sampler, 0, x[labels == c])
        assert float(stores[c].patterns["0"]["n"]) == rows.shape[0]  # counts count the sampled positions
        want = layer_patterns(rows, conv.weight.detach(), conv.bias.detach(), conv.groups)
        for key, expected in want.items():
            assert _relative_error(stores[c].patterns["0"][key], expected) < 1e-9, (case, c, key)
        assert stores[c].estimator["position_rate"] == 0.3 and stores[c].estimator["position_seed"] == 7


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_second_conv_layer_and_linear_head_in_a_net(dtype, tol):
    """Layer 1 gets its own positions (layer salt), float32 uses both the float64-product and plain paths,
    and the Linear head keeps every sample."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 40, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(40 * 4 * 4, 3)).to(dtype)
    x = (torch.randn(9, 3, 10, 10) + 0.5).to(dtype)
    labels = torch.tensor([0, 1, 2] * 3)
    sampler = PositionSampler(0.25, seed=1)
    full = _fit(net, x, labels, position_rate=1.0)
    stores = _fit(net, x, labels, position_rate=0.25, position_seed=1)
    for c in range(3):
        xc = x[labels == c]
        hidden = net[:2](xc)
        for name, conv, inp, index in (("0", net[0], xc, 0), ("2", net[2], hidden, 1)):
            rows = _selected_patches(conv, inp.double(), sampler, index, xc)
            want = layer_patterns(rows, conv.weight.detach(), conv.bias.detach(), 1)
            for key, expected in want.items():
                assert _relative_error(stores[c].patterns[name][key], expected) < tol, (name, key)
        head = stores[c].patterns["5"]
        assert float(head["n"]) == float(full[c].patterns["5"]["n"]) == 3
        assert _relative_error(head["a_pos"], full[c].patterns["5"]["a_pos"]) < 1e-5


def test_rate_one_and_rates_that_keep_every_position_are_bit_identical_to_the_full_path():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 4))
    x, labels = torch.randn(10, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0] * 2)
    program = Program(net)
    reference = Moments(program, 4)
    reference.update(x, labels)
    # 64 and 36 positions: ceil(0.999 * P) == P, so every layer takes the full path
    for sampler in (PositionSampler(1.0), PositionSampler(0.999, seed=3)):
        m = Moments(program, 4, sampler)
        m.update(x, labels)
        for name, lm in m.layers.items():
            assert torch.equal(lm.mat, reference.layers[name].mat) and torch.equal(lm.vec, reference.layers[name].vec)
    default, one = _fit(net, x, labels), _fit(net, x, labels, position_rate=1)
    for c in default:
        for name, p in default[c].patterns.items():
            assert all(torch.equal(v, one[c].patterns[name][k]) for k, v in p.items())
        assert "position_rate" not in one[c].estimator


def test_positions_depend_on_seed_layer_and_image_only():
    torch.manual_seed(4)
    x = torch.randn(6, 3, 8, 8)
    s = PositionSampler(0.2, seed=11)
    keys = s.image_keys(x)
    index = s.select(keys, 0, 64)
    assert index.shape == (6, 13) and bool((index.diff(dim=1) > 0).all())  # distinct, ascending
    assert torch.equal(PositionSampler(0.2, seed=11).select(PositionSampler(0.2, 11).image_keys(x[[4, 1]]), 0, 64),
                       index[[4, 1]])  # batch composition and order do not matter
    assert not torch.equal(PositionSampler(0.2, seed=12).select(PositionSampler(0.2, 12).image_keys(x), 0, 64), index)
    assert not torch.equal(s.select(keys, 1, 64), index)  # each layer draws its own positions
    assert torch.equal(s.image_keys(x.double()), s.image_keys(x.double()))
    # every position is equally likely: over many images each is chosen ~ rate of the time
    many = s.select(s.image_keys(torch.randn(4000, 1, 2, 2)), 0, 64)
    freq = torch.bincount(many.reshape(-1), minlength=64).double() / 4000
    assert (freq - 13 / 64).abs().max() < 0.03


def test_same_seed_same_sums_whatever_the_batching():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, groups=2)).double()
    x, labels = torch.randn(12, 2, 9, 9, dtype=torch.float64), torch.tensor([0, 1, 2] * 4)
    program = Program(net)

    def sums(batch, seed, order=None):
        order = torch.arange(12) if order is None else order
        m = Moments(program, 3, PositionSampler(0.3, seed))
        m.reshift([lm.shift for lm in _first_shift(program, x).layers.values()])  # one shift for all runs
        for i in range(0, 12, batch):
            m.update(x[order[i:i + batch]], labels[order[i:i + batch]])
        return [t for lm in m.layers.values() for t in (lm.mat, lm.vec)]

    a, b, shuffled, again, other = sums(4, 1), sums(5, 1), sums(3, 1, torch.randperm(12)), sums(4, 1), sums(4, 2)
    assert all(torch.equal(u, v) for u, v in zip(a, again))
    for u, v in list(zip(a, b)) + list(zip(a, shuffled)):
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-12)
    assert not all(torch.allclose(u, v) for u, v in zip(a, other))


def _first_shift(program: Program, x: torch.Tensor) -> Moments:
    m = Moments(program, 1)
    m.update(x, torch.full((x.shape[0],), -1))
    return m


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.0001, 2, math.nan, math.inf, "0.5", True, None])
def test_bad_rate_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"position_rate=.* is not a fraction in \(0, 1\]"):
        SignalEstimator(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), position_rate=bad)
    with pytest.raises(ValueError, match="position_rate"):
        check_rate(bad)


def test_bad_seed_is_a_clear_error():
    with pytest.raises(ValueError, match=r"position_seed=1.5 must be an integer"):
        PositionSampler(0.5, seed=1.5)


def test_store_records_the_rate_and_survives_a_round_trip(tmp_path):
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    x, labels = torch.randn(6, 1, 8, 8), torch.tensor([0, 1] * 3)
    store = SignalEstimator(net, progress=False, position_rate=0.5, position_seed=3).fit(_loader(x, labels, 3))[0]
    store.save(tmp_path / "s.pkl")
    loaded = SignalStore.load(tmp_path / "s.pkl")
    assert loaded.estimator["position_rate"] == 0.5 and loaded.estimator["position_seed"] == 3
    assert float(loaded.patterns["0"]["n"]) == 3 * 18  # ceil(0.5 * 36) of 36 positions, 3 images


def test_cli_estimate_with_position_rate(tmp_path):
    from untangle_ext import cli

    prefix = str(tmp_path / "s")
    common = ["estimate", "--model", "untangle_ext.models:LeNet", "--random-weights", "--store-prefix", prefix,
              "--classes", "3", "--limit", "5"]
    with pytest.raises(SystemExit, match=r"--position-rate=1.5 is not a fraction in \(0, 1\]"):
        cli.main([*common, "--position-rate", "1.5"])
    assert cli.main([*common, "--position-rate", "0.25", "--position-seed", "4"]) == 0
    store = SignalStore.load(f"{prefix}_class_3.pkl")
    assert store.estimator["position_rate"] == 0.25 and store.estimator["position_seed"] == 4
    assert store.num_samples == 5


def test_signal_quality_scores_only_the_named_layers_with_the_same_numbers():
    from untangle_ext.quality.rho import signal_quality
    from untangle_ext.store import ALL_CLASSES

    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.rand(240, 1, 8, 8)
    store = SignalEstimator(model, per_class=False, progress=False, position_rate=0.5).fit(
        [(x[:80], torch.zeros(80, dtype=torch.long))])[ALL_CLASSES]
    every = signal_quality(model, store, x[80:160], x[160:], max_neurons=3, positions=3, progress=False)
    first = signal_quality(model, store, x[80:160], x[160:], max_neurons=3, positions=3, progress=False,
                           layers=["0"], chunk=1)
    assert set(first) == {"0"} and first["0"]["S_a±"]["rho"] == pytest.approx(every["0"]["S_a±"]["rho"], abs=1e-9)
    with pytest.raises(ValueError, match=r"layers \['9'\] are not affine layers"):
        signal_quality(model, store, x[80:160], x[160:], layers=["9"], progress=False)


def test_grouped_layer_with_only_skipped_images_adds_nothing():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    m = Moments(Program(net), 2, PositionSampler(0.5))
    m.update(torch.randn(3, 4, 6, 6), torch.full((3,), -1))
    lm = m.layers["0"]
    assert not lm.mat.any() and not lm.vec.any() and lm.shift is not None
