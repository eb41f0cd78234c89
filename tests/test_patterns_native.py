"""The native pattern op (csrc/cpu/patterns.cpp) == the PyTorch formulas (``_reference.layer_patterns``).

What is asserted, and why. The PyTorch code forms cov_i = s_xy,i/n − (s_x,i/n)·E[y] (+ shift_i·δ) and
a_i = cov_i / (w·cov); the native loop forms n·cov_i without the divisions (a is invariant to that
positive factor) and reduces w·cov, ‖cov‖ and ‖a‖ in another order.
So each a_i may differ by the rounding of its own terms, T_i = (|s_xy,i| + |s_x,i·E[y]|)/n + |shift_i·δ|,
plus the rounding of the denominator (a reordered sum of D terms: γ_D = D·ε/(1 − D·ε)):

    |Δa_i| ≤ (8ε·T_i + |a_i|·(8ε + 2γ_D)·Σ_j |w_j|·T_j) / |w·cov| + 3ε·|a_i|

(ε = float64 epsilon) — a few ulp of float64 before the final rounding for a well-conditioned
neuron, more only where the covariance itself cancels. That bound is asserted per element. The
rounded outputs (float32, float16, bfloat16) must equal the op's own float64 result rounded (one
rounding), and κ = ‖a‖·‖w‖ must match a float64 recomputation from the stored patterns to (D + 4)·ε
relative (sums of squares). Which neurons are dead must agree exactly (the data stay far from the
1e-12 threshold, except in the test built to sit on it).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from untangle_ext import _reference, ops
from untangle_ext.conditioning import Limits, kappa
from untangle_ext.moments import Moments
from untangle_ext.patterns import compute_patterns
from untangle_ext.trace import Program

NATIVE = ops.backend().name == "native"
pytestmark = pytest.mark.skipif(not NATIVE, reason=f"native backend unavailable: {ops.backend().reason}")
EPS = torch.finfo(torch.float64).eps
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

MODELS = {  # odd sizes, groups, every conv rank; input shapes without the batch dim
    "linear": (lambda: nn.Sequential(nn.Linear(37, 21), nn.ReLU(), nn.Linear(21, 3)), (37,)),
    "linear_tokens": (lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Flatten(), nn.Linear(28, 2)), (4, 5)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv1d(5, 4, 2, stride=2)), (3, 11)),
    "conv2d_groups": (lambda: nn.Sequential(nn.Conv2d(4, 12, 3, padding=1, groups=2), nn.ReLU(),
                                            nn.Conv2d(12, 6, 2, groups=3)), (4, 7, 6)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 6, (2, 3, 2), groups=2, dilation=(1, 2, 1))), (2, 4, 7, 5)),
}


def _moments(name: str, images: int = 24, slots: int = 2, offset: float = 0.3) -> Moments:
    """Moments of a random model on random data; neuron 1 of the first layer is dead (zero weights),
    neuron 2 always positive (large bias), so a⁻ of it has an empty regime."""
    build, shape = MODELS[name]
    torch.manual_seed(3)
    model = build()
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[0].bias[2] = 50.0
    moments = Moments(Program(model), slots)
    for _ in range(3):
        x = torch.randn(images // 3, *shape) + offset
        moments.update(x, torch.arange(images // 3) % slots)
    return moments


def _args(lm, slot: int = 0, positive: bool = False, dtype: torch.dtype = torch.float64) -> tuple:
    return lm.mat[slot], lm.vec[slot], lm.layer.weight.detach(), lm.patch_shift(), positive, dtype


def _terms(sums, vec, weight, shift, positive) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per regime (lin, pos, neg): T (K, D), the magnitude of cov's terms, and w·cov (K,), from SPEC's formulas."""
    g, rows, d = sums.shape
    kg = (rows - 1) // 3
    k = g * kg
    per_neuron = lambda t: t.reshape(k, d)  # noqa: E731
    sxy, spx, spxy = (per_neuron(sums[:, i * kg:(i + 1) * kg]) for i in range(3))
    sx = sums[:, 3 * kg:].expand(g, kg, d).reshape(k, d)
    sh = shift.reshape(g, 1, d).expand(g, kg, d).reshape(k, d)
    n, n_pos, sum_y, pos_sum_y = vec[-1], vec[k:2 * k], vec[:k], vec[2 * k:3 * k]
    ey_all = sum_y / n.clamp(min=1)
    out = []
    for s_xy, s_x, cnt, sy, shifted in ((sxy, sx, n.expand(k), sum_y, False), (spxy, spx, n_pos, pos_sum_y, True),
                                         (sxy - spxy, sx - spx, n - n_pos, sum_y - pos_sum_y, True)):
        n1 = cnt.clamp(min=1).unsqueeze(1)
        ey_r = (sy / cnt.clamp(min=1)).unsqueeze(1)
        ey = ey_r if positive and shifted else ey_all.unsqueeze(1)
        delta = (ey_r - ey_all.unsqueeze(1)) if shifted and not positive else torch.zeros_like(ey)
        cov = s_xy / n1 - (s_x / n1) * ey + sh * delta
        terms = (s_xy.abs() + (s_x * ey).abs()) / n1 + (sh * delta).abs()
        out.append((terms, (weight.double().reshape(k, d) * cov).sum(1)))
    return out


def _assert_close_to_reference(args: tuple) -> None:
    """Native float64 vs the PyTorch code within the bound of the module docstring; κ; dead rows."""
    sums, vec, weight, shift, positive, _ = args
    nat = torch.ops.untangle_ext.layer_patterns(sums, vec, weight, shift, positive, torch.float64)
    ref = _reference.layer_patterns(sums, vec, weight, shift, positive, torch.float64)
    k, d = weight.shape[0], weight[0].numel()
    w = weight.double().reshape(k, d)
    gamma = d * EPS / (1 - d * EPS)
    for e, (a, b, (terms, den)) in enumerate(zip(nat[:3], ref[:3], _terms(sums, vec, weight, shift, positive))):
        a, b = a.reshape(k, d), b.reshape(k, d)
        assert a.dtype == torch.float64 and torch.isfinite(a).all()
        assert torch.equal((a == 0).all(1), (b == 0).all(1)), f"estimator {e}: dead neurons differ"
        spread = (w.abs() * terms).sum(1, keepdim=True)
        bound = (8 * EPS * terms + b.abs() * (8 * EPS + 2 * gamma) * spread) / den.abs().unsqueeze(1) \
            + 3 * EPS * b.abs()
        bound[(b == 0).all(1)] = 0  # dead rows: exactly zero in both
        assert ((a - b).abs() <= bound).all(), f"estimator {e}: max excess {((a - b).abs() - bound).max()}"
        want_kappa = kappa(a, w)
        assert torch.allclose(nat[3][e], want_kappa, rtol=(d + 4) * EPS, atol=0), f"estimator {e}: κ"
        assert torch.allclose(ref[3][e], kappa(b, w), rtol=(d + 4) * EPS, atol=0), f"estimator {e}: reference κ"


@pytest.mark.parametrize("positive", [False, True], ids=["mean_y_all", "mean_y_positive"])
@pytest.mark.parametrize("name", list(MODELS))
def test_native_equals_reference_on_every_layer_kind(name, positive):
    moments = _moments(name)
    live = 0
    for lm in moments.layers.values():
        for slot in range(moments.num_slots):
            args = _args(lm, slot, positive)
            _assert_close_to_reference(args)
            a_pos = torch.ops.untangle_ext.layer_patterns(*args)[1]
            live += int((a_pos.reshape(a_pos.shape[0], -1) != 0).any(1).sum())
    assert live > 0  # not a comparison of zero tensors


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("name", ["linear", "conv2d_groups"])
def test_rounded_outputs_are_the_float64_result_rounded_once(name, dtype):
    lm = next(iter(_moments(name).layers.values()))
    nat64 = torch.ops.untangle_ext.layer_patterns(*_args(lm))
    nat = torch.ops.untangle_ext.layer_patterns(*_args(lm, dtype=dtype))
    for a, a64 in zip(nat[:3], nat64[:3]):
        assert a.dtype == dtype and a.shape == lm.layer.weight.shape
        assert torch.equal(a, a64.to(dtype))
    k = lm.layer.out_features
    w = lm.layer.weight.double().reshape(k, -1)
    for e in range(3):  # κ of the stored (rounded) patterns
        assert torch.allclose(nat[3][e], kappa(nat[e].reshape(k, -1), w), rtol=64 * EPS, atol=0)


def test_native_weights_of_every_dtype_are_read_as_float64():
    lm = next(iter(_moments("conv1d").layers.values()))
    sums, vec, weight, shift, _, _ = _args(lm)
    for wdtype in (torch.float64, torch.float16, torch.bfloat16):
        w = weight.to(wdtype)
        nat = torch.ops.untangle_ext.layer_patterns(sums, vec, w, shift, False, torch.float64)
        ref = _reference.layer_patterns(sums, vec, w, shift, False, torch.float64)
        for a, b in zip(nat, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def _synthetic(k: int = 6, d: int = 9, n: float = 40.0, n_pos=None, seed: int = 0) -> tuple:
    """Random (not data-consistent) sums of one Linear layer: every formula branch without a model."""
    gen = torch.Generator().manual_seed(seed)
    sums = torch.randn(1, 3 * k + 1, d, generator=gen, dtype=torch.float64) * 10
    n_pos = torch.randint(1, int(n), (k,), generator=gen).double() if n_pos is None else n_pos
    vec = torch.cat([torch.randn(k, generator=gen, dtype=torch.float64) * 5, n_pos,
                     torch.randn(k, generator=gen, dtype=torch.float64) * 5, torch.tensor([n], dtype=torch.float64)])
    weight = torch.randn(k, d, generator=gen)
    shift = torch.randn(1, d, generator=gen, dtype=torch.float64)
    return sums, vec, weight, shift


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("case", ["n_pos_0", "n_pos_n", "single_sample", "no_samples", "mixed"])
def test_empty_regimes_single_sample_and_no_samples(case, positive):
    k = 6
    n, n_pos = {"n_pos_0": (40.0, torch.zeros(k)), "n_pos_n": (40.0, torch.full((k,), 40.0)),
                "single_sample": (1.0, torch.tensor([0.0, 1, 0, 1, 0, 1])), "no_samples": (0.0, torch.zeros(k)),
                "mixed": (40.0, torch.tensor([0.0, 40, 1, 39, 20, 3]))}[case]
    sums, vec, weight, shift = _synthetic(k, n=n, n_pos=n_pos.double())
    args = (sums, vec, weight, shift, positive, torch.float64)
    _assert_close_to_reference(args)
    a_lin, a_pos, a_neg, kap = torch.ops.untangle_ext.layer_patterns(*args)
    empty_pos, empty_neg = n_pos == 0, n_pos == n
    assert not a_pos[empty_pos].any() and not a_neg[empty_neg].any()
    assert torch.equal(kap[1][empty_pos], torch.zeros(int(empty_pos.sum()), dtype=torch.float64))
    if n <= 1:  # a_lin needs two samples
        assert not a_lin.any() and not kap[0].any()
    else:
        assert a_lin.all(1).all()
    live = ~empty_pos if n > 0 else torch.zeros(k, dtype=torch.bool)
    assert a_pos[live].all(1).all()  # random sums: every non-empty regime has a pattern
    w = weight.double()
    for a in (a_lin, a_pos, a_neg):  # wᵀa = 1 for every live neuron
        alive = a.any(1)
        torch.testing.assert_close((w * a).sum(1)[alive], torch.ones(int(alive.sum()), dtype=torch.float64))


def test_vanishing_denominator_and_zero_weights_give_zero_patterns():
    k, d = 4, 9
    sums, vec, weight, shift = _synthetic(k, d)
    cov = _reference.layer_patterns(sums, vec, torch.ones(k, d, dtype=torch.float64), shift, False,
                                    torch.float64)[0] * d  # any w: a_lin ∝ cov, so this recovers cov's direction
    w = weight.double()
    w[0] -= (w[0] @ cov[0]) / (cov[0] @ cov[0]) * cov[0]  # w_0 ⟂ cov_0: w·cov ≈ 1e-16 relative, below 1e-12
    w[1] = 0  # zero weights
    args = (sums, vec, w, shift, False, torch.float64)
    _assert_close_to_reference(args)
    a_lin, _, _, kap = torch.ops.untangle_ext.layer_patterns(*args)
    assert not a_lin[0].any() and not a_lin[1].any() and kap[0, 0] == 0 and kap[0, 1] == 0
    assert a_lin[2:].all()


def test_compute_patterns_native_equals_pytorch_path(monkeypatch):
    """End to end (counts, κ, limits that kill neurons) for a store dtype of float32."""
    moments = _moments("conv2d_groups")
    limits = Limits(kappa_max=1.5, min_samples=100)  # tight: neurons die from each rule (κ 1.0-5.3, n+ 0-504)
    killed = 0
    for lm in moments.layers.values():
        nat = compute_patterns(lm, 1, "all", torch.float32, limits)
        with monkeypatch.context() as m:
            m.setattr(ops, "layer_patterns", _reference.layer_patterns)
            ref = compute_patterns(lm, 1, "all", torch.float32, limits)
        assert nat.keys() == ref.keys()
        for key in nat:
            if key.startswith("a_"):  # one float32 ulp where the float64 values straddle a rounding boundary
                ulp = torch.finfo(torch.float32).eps * ref[key].abs()
                assert ((nat[key] - ref[key]).abs() <= ulp).all(), key
            else:
                torch.testing.assert_close(nat[key], ref[key], rtol=1e-6, atol=0)
        for key, regime in (("a_lin", "lin"), ("a_pos", "pos")):
            beyond = (nat[f"kappa_{regime}"] > limits.kappa_max) | (nat["n_pos"] < limits.min_samples) \
                if regime == "pos" else nat["kappa_lin"] > limits.kappa_max
            assert not nat[key][beyond].any()
            killed += int(beyond.sum())
    assert killed >= 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["linear", "conv2d_groups"])
def test_opcheck(name, dtype):
    lm = next(iter(_moments(name).layers.values()))
    torch.library.opcheck(torch.ops.untangle_ext.layer_patterns, _args(lm, 0, False, dtype))
    torch.library.opcheck(torch.ops.untangle_ext.layer_patterns, _args(lm, 1, True, dtype))


KEEPS = [(False, True, False), (True, False, True), (False, False, False)]


@pytest.mark.parametrize("keep", KEEPS, ids=["a_pos", "lin_neg", "none"])
@pytest.mark.parametrize("impl", ["native", "torch"])
def test_patterns_not_kept_are_empty_and_the_rest_unchanged(impl, keep):
    """keep=...: the kept patterns and all three κ are those of the full call, bit for bit; the others are empty."""
    op = torch.ops.untangle_ext.layer_patterns if impl == "native" else _reference.layer_patterns
    lm = next(iter(_moments("conv2d_groups").layers.values()))
    args = _args(lm, dtype=torch.float16)
    full, part = op(*args), op(*args, list(keep))
    for kept, a, b in zip(keep, full[:3], part[:3]):
        assert torch.equal(a, b) if kept else (b.numel() == 0 and b.dtype == torch.float16)
    assert torch.equal(full[3], part[3]) and bool((full[3] > 0).any())


def test_compute_patterns_returns_the_kept_keys_with_the_same_limits_and_kappas():
    lm = next(iter(_moments("linear").layers.values()))
    limits = Limits(kappa_max=3.0, min_samples=2)  # some neurons beyond both limits
    full = compute_patterns(lm, 0, "all", torch.float32, limits)
    part = compute_patterns(lm, 0, "all", torch.float32, limits, keys=("a_pos",))
    assert set(full) - set(part) == {"a_lin", "a_neg"}
    for key, value in part.items():
        assert torch.equal(value, full[key]), key
    assert bool((full["a_pos"] == 0).all(1).any()) and bool((full["a_pos"] != 0).any())
    with pytest.raises(ValueError, match="keys must be among"):
        compute_patterns(lm, 0, keys=("a_plus",))


@pytest.mark.parametrize("keep", KEEPS[:2], ids=["a_pos", "lin_neg"])
def test_opcheck_with_keep(keep):
    lm = next(iter(_moments("conv2d_groups").layers.values()))
    torch.library.opcheck(torch.ops.untangle_ext.layer_patterns, (*_args(lm, 0, False, torch.float32), list(keep)))


def _bad(sums, vec, weight, shift):
    return lambda: torch.ops.untangle_ext.layer_patterns(sums, vec, weight, shift, False, torch.float32)


@pytest.mark.parametrize("change, message", [
    (lambda s, v, w, sh: (s.float(), v, w, sh), "sums must be a contiguous float64 tensor with 3 dims"),
    (lambda s, v, w, sh: (s.transpose(1, 2).contiguous().transpose(1, 2), v, w, sh), r"\(not contiguous\)"),
    (lambda s, v, w, sh: (s[:, :-1], v, w, sh), "3 Kg \\+ 1 rows per group"),
    (lambda s, v, w, sh: (s, v[:-1], w, sh), "vec must hold 3 K \\+ 1 = 19 values"),
    (lambda s, v, w, sh: (s, v, w, sh.reshape(-1)), "shift must be a contiguous float64 tensor with 2 dims"),
    (lambda s, v, w, sh: (s, v, w, sh[:, :-1].contiguous()), r"shift must be \(1, 9\)"),
    (lambda s, v, w, sh: (s, v, w[:, :-1], sh), "weight must be a floating tensor of 6 neurons with 9 inputs"),
    (lambda s, v, w, sh: (s, v, w.int(), sh), "weight must be a floating tensor"),
])
def test_bad_inputs_are_refused_with_the_cause(change, message):
    with pytest.raises(RuntimeError, match=message):
        _bad(*change(*_synthetic()))()


def test_bad_output_dtype_is_refused():
    sums, vec, weight, shift = _synthetic()
    with pytest.raises(RuntimeError, match="dtype must be a floating dtype"):
        torch.ops.untangle_ext.layer_patterns(sums, vec, weight, shift, False, torch.int32)


def test_cuda_tensors_take_the_pytorch_code():
    """The op has no CUDA kernel: the routed function sends CUDA tensors to the PyTorch code (documented)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("untangle_ext::layer_patterns", "CPU") and not has("untangle_ext::layer_patterns", "CUDA")
    assert ops.layer_patterns.__doc__ == _reference.layer_patterns.__doc__
    if torch.cuda.is_available():
        sums, vec, weight, shift = (t.cuda() for t in _synthetic())
        got = ops.layer_patterns(sums, vec, weight, shift, False, torch.float64)
        want = _reference.layer_patterns(*(t.cpu() for t in (sums, vec, weight, shift)), False, torch.float64)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=0)
