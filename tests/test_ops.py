"""The hot ops: native kernels == PyTorch engine == an independent float64 oracle.

The oracle below is written from SPEC §2 with explicit per-sample products and
``F.unfold`` in float64; it shares no code with ``untangle_ext._reference``.
CUDA variants run only where a GPU is visible.
"""
from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from untangle_ext import _reference, ops
from untangle_ext.moments import Moments
from untangle_ext.patterns import compute_patterns
from untangle_ext.trace import Program

NATIVE = ops.backend().name == "native"
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native backend unavailable: {ops.backend().reason}")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLS = {"reference": _reference}
if NATIVE:
    IMPLS["native"] = torch.ops.untangle_ext


# ---------------------------------------------------------------- float64 oracle
def oracle_accumulate(x, weight, shift, out_offset, slots, num_slots, conv=None):
    """mat, vec and z from explicit float64 per-sample products (SPEC §2)."""
    x, w = x.double(), weight.double()
    k = w.shape[0]
    if conv is None:
        groups, patches, y_shape = 1, (x - shift.double()).unsqueeze(2), None  # (N, D, 1)
        w_flat = w
    else:
        stride, padding, dilation, groups = conv
        ph, pw = padding
        xt = F.pad(x, (pw, pw, ph, ph)) - shift.double().view(1, -1, 1, 1)
        kh, kw = w.shape[2:]
        patches = F.unfold(xt, (kh, kw), dilation=dilation, stride=stride)  # (N, C*kh*kw, L)
        ho = (xt.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        y_shape = (ho, patches.shape[2] // ho)
        w_flat = w.reshape(k, -1)
    kg, dg = k // groups, w_flat.shape[1]
    mat = torch.zeros(num_slots, groups, 3 * kg + 1, dg, dtype=torch.float64)
    vec = torch.zeros(num_slots, 5 * k + 1, dtype=torch.float64)
    zs = []
    for i in range(x.shape[0]):
        p = patches[i]  # (G*Dg, L)
        y = torch.cat([w_flat[g * kg:(g + 1) * kg] @ p[g * dg:(g + 1) * dg] for g in range(groups)])  # (K, L)
        z = y + out_offset.double().view(-1, 1)
        zs.append(z)
        s = int(slots[i])
        if not 0 <= s < num_slots:
            continue
        gate = (z > 0).double()
        for g in range(groups):
            rows = slice(g * kg, (g + 1) * kg)
            design = torch.cat([y[rows], gate[rows], gate[rows] * y[rows], torch.ones_like(y[:1])])
            mat[s, g] += design @ p[g * dg:(g + 1) * dg].t()
        gy = gate * y
        vec[s, :5 * k] += torch.cat([y.sum(1), (y * y).sum(1), gate.sum(1), gy.sum(1), (gy * y).sum(1)])
        vec[s, -1] += y.shape[1]
    z = torch.stack(zs) if zs else torch.zeros(0, k, 1, dtype=torch.float64)
    z = z.view(x.shape[0], k) if conv is None else z.view(x.shape[0], k, *(y_shape or (0, 0)))
    return z, mat, vec


def oracle_backward_linear(grad_out, patterns, slots):
    out = torch.zeros(grad_out.shape[0], patterns.shape[2], dtype=torch.float64)
    for i in range(grad_out.shape[0]):
        s = 0 if patterns.shape[0] == 1 else int(slots[i])
        if 0 <= s < patterns.shape[0]:
            out[i] = grad_out[i].double() @ patterns[s].double()
    return out


def oracle_backward_conv(grad_out, patterns, slots, input_hw, stride, padding, dilation, groups):
    """The input gradient of conv2d(input, patterns[slot]) by autograd, per row, in float64."""
    c = patterns.shape[2] * groups
    out = torch.zeros(grad_out.shape[0], c, *input_hw, dtype=torch.float64)
    for i in range(grad_out.shape[0]):
        s = 0 if patterns.shape[0] == 1 else int(slots[i])
        if not 0 <= s < patterns.shape[0]:
            continue
        inp = torch.zeros(1, c, *input_hw, dtype=torch.float64, requires_grad=True)
        y = F.conv2d(inp, patterns[s].double(), None, stride, padding, dilation, groups)
        (out[i],) = torch.autograd.grad(y, inp, grad_out[i:i + 1].double())
    return out


# ---------------------------------------------------------------- random cases
def _maybe_strided(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Half the time, the same values in a non-contiguous layout."""
    if rng.random() < 0.5:
        return t
    big = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    return big[..., ::2]


def _slots(n, num_slots, rng, device):
    """Random slots with skipped rows (-1, or past the end) and often an empty class."""
    choices = list(range(num_slots - 1)) if num_slots > 1 and rng.random() < 0.5 else list(range(num_slots))
    vals = [rng.choice(choices + [-1]) if rng.random() < 0.8 else rng.choice([-1, num_slots]) for _ in range(n)]
    return torch.tensor(vals, dtype=torch.long, device=device)


def linear_case(seed, dtype, device):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n, d, k, s = rng.choice([0, 1, 2, 7, 33]), rng.randint(1, 23), rng.randint(1, 17), rng.randint(1, 4)
    x = (torch.randn(n, d, generator=g) * 2 + 3).to(dtype)
    w = torch.randn(k, d, generator=g).to(dtype)
    shift = x.mean(0) if n else torch.zeros(d, dtype=dtype)
    off = torch.randn(k, generator=g, dtype=torch.float64)
    args = [_maybe_strided(x.to(device), rng), w.to(device), shift.to(device), off.to(device),
            _slots(n, s, rng, device)]
    return args, s, None


def conv_case(seed, dtype, device):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    groups = rng.choice([1, 1, 2, 3])
    c, k = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    kh, kw = rng.randint(1, 3), rng.randint(1, 3)
    stride, padding, dilation = (rng.randint(1, 2), rng.randint(1, 3)), (rng.randint(0, 2), rng.randint(0, 1)), \
        (rng.randint(1, 2), rng.randint(1, 2))
    h = dilation[0] * (kh - 1) + 1 + rng.randint(0, 6)
    wd = dilation[1] * (kw - 1) + 1 + rng.randint(0, 6)
    n, s = rng.choice([0, 1, 3, 6]), rng.randint(1, 4)
    x = (torch.randn(n, c, h, wd, generator=g) + 2).to(dtype)
    w = torch.randn(k, c // groups, kh, kw, generator=g).to(dtype)
    shift = x.mean((0, 2, 3)) if n else torch.zeros(c, dtype=dtype)
    off = torch.randn(k, generator=g, dtype=torch.float64)
    args = [_maybe_strided(x.to(device), rng), w.to(device), shift.to(device), off.to(device),
            _slots(n, s, rng, device)]
    return args, s, (stride, padding, dilation, groups)


def _accumulators(weight, num_slots, groups, device):
    k, dg = weight.shape[0], weight[0].numel()
    mat = torch.zeros(num_slots, groups, 3 * (k // groups) + 1, dg, dtype=torch.float64, device=device)
    vec = torch.zeros(num_slots, 5 * k + 1, dtype=torch.float64, device=device)
    return mat, vec


def run_accumulate(impl, args, num_slots, conv):
    """Two batches through ``impl`` (the second one accumulates onto the first)."""
    groups = conv[3] if conv else 1
    mat, vec = _accumulators(args[1], num_slots, groups, args[0].device)
    for _ in range(2):
        if conv is None:
            z = impl.accumulate_linear(*args, mat, vec)
        else:
            z = impl.accumulate_conv2d(*args, mat, vec, *[list(v) for v in conv[:3]], conv[3])
    return z, mat, vec


def _close(actual, expected, rtol):
    """Agreement relative to the largest magnitude of ``expected`` (sums of many products)."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item() if expected.numel() else 0.0
    assert actual.shape == expected.shape and err <= rtol * scale, f"max error {err:g} (scale {scale:g})"


ACC_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("seed", range(6))
def test_accumulate_matches_oracle(kind, dtype, device, seed):
    args, num_slots, conv = (linear_case if kind == "linear" else conv_case)(seed, dtype, device)
    z1, mat1, vec1 = oracle_accumulate(*[a.cpu() for a in args], num_slots, conv)
    for name, impl in IMPLS.items():
        z, mat, vec = run_accumulate(impl, args, num_slots, conv)
        assert z.dtype == dtype and z.device == args[0].device, name
        _close(z, z1, ACC_RTOL[dtype])
        _close(mat, 2 * mat1, ACC_RTOL[dtype])
        _close(vec, 2 * vec1, ACC_RTOL[dtype])


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_accumulate_half_inputs_on_cuda(kind, dtype):
    """fp16/bf16 inputs: products in float32, totals in float64, output in the input dtype."""
    args, num_slots, conv = (linear_case if kind == "linear" else conv_case)(11, dtype, "cuda")
    z1, mat1, vec1 = oracle_accumulate(*[a.cpu() for a in args], num_slots, conv)
    z, mat, vec = run_accumulate(torch.ops.untangle_ext, args, num_slots, conv)
    assert z.dtype == dtype and mat.dtype == torch.float64
    _close(z, z1, 1e-2)
    _close(mat, 2 * mat1, 1e-4)
    _close(vec, 2 * vec1, 1e-4)


def pattern_case(seed, kind, dtype, device):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n, s = rng.choice([0, 1, 5, 12]), rng.randint(1, 4)
    slots = _slots(n, s, rng, device)
    if kind == "linear":
        k, d = rng.randint(1, 9), rng.randint(1, 13)
        go = torch.randn(n, k, generator=g).to(dtype)
        pats = torch.randn(s, k, d, generator=g).to(dtype)
        return [_maybe_strided(go.to(device), rng), pats.to(device), slots], {}
    _, _, conv = conv_case(seed, dtype, "cpu")
    stride, padding, dilation, groups = conv
    c, k = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    kh, kw = rng.randint(1, 3), rng.randint(1, 3)
    hw = (dilation[0] * (kh - 1) + 1 + rng.randint(0, 5), dilation[1] * (kw - 1) + 1 + rng.randint(0, 5))
    ho = (hw[0] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (hw[1] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    go = torch.randn(n, k, ho, wo, generator=g).to(dtype)
    pats = torch.randn(s, k, c // groups, kh, kw, generator=g).to(dtype)
    extra = [list(hw), list(stride), list(padding), list(dilation), groups]
    return [_maybe_strided(go.to(device), rng), pats.to(device), slots], {"extra": extra}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("seed", range(6))
def test_pattern_backward_matches_oracle(kind, dtype, device, seed):
    args, kw = pattern_case(seed, kind, dtype, device)
    extra = kw.get("extra", [])
    cpu = [a.cpu() for a in args]
    want = oracle_backward_linear(*cpu) if kind == "linear" else oracle_backward_conv(*cpu, *extra)
    for name, impl in IMPLS.items():
        got = getattr(impl, f"pattern_backward_{kind}")(*args, *extra)
        assert got.dtype == dtype, name
        _close(got, want, ACC_RTOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_pattern_backward_conv_large_layer_groups_by_class(device):
    """Patterns too big to gather per pair (> 8 MB) take the group-by-class path."""
    g = torch.Generator().manual_seed(7)
    go = torch.randn(66, 64, 3, 3, generator=g)
    pats = torch.randn(4, 64, 64, 3, 3, generator=g)
    slots = torch.randint(-1, 4, (66,), generator=g)
    extra = [[5, 5], [1, 1], [0, 0], [1, 1], 1]
    want = oracle_backward_conv(go, pats, slots, *extra)
    for name, impl in IMPLS.items():
        _close(impl.pattern_backward_conv2d(go.to(device), pats.to(device), slots.to(device), *extra), want, 2e-5)


# ---------------------------------------------------------------- op contracts
@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    lin, s, _ = linear_case(3, torch.float32, device)
    torch.library.opcheck(torch.ops.untangle_ext.accumulate_linear, (*lin, *_accumulators(lin[1], s, 1, device)))
    conv, s, (stride, padding, dilation, groups) = conv_case(5, torch.float32, device)
    torch.library.opcheck(
        torch.ops.untangle_ext.accumulate_conv2d,
        (*conv, *_accumulators(conv[1], s, groups, device), list(stride), list(padding), list(dilation), groups))
    args, _ = pattern_case(2, "linear", torch.float32, device)
    torch.library.opcheck(torch.ops.untangle_ext.pattern_backward_linear, tuple(args))
    args, kw = pattern_case(4, "conv2d", torch.float32, device)
    torch.library.opcheck(torch.ops.untangle_ext.pattern_backward_conv2d, (*args, *kw["extra"]))


@needs_native
def test_bad_inputs_name_the_argument():
    x, w = torch.randn(4, 3), torch.randn(2, 3)
    mat, vec = torch.zeros(1, 1, 7, 3, dtype=torch.float64), torch.zeros(1, 11, dtype=torch.float64)
    good = [x, w, torch.zeros(3), torch.zeros(2, dtype=torch.float64), torch.zeros(4, dtype=torch.long), mat, vec]
    op = torch.ops.untangle_ext.accumulate_linear
    bad = {
        0: (torch.randn(4, 3, 1), "x must be"),
        1: (torch.randn(2, 3, dtype=torch.float64), "weight dtype"),
        2: (torch.zeros(5), "shift"),
        3: (torch.zeros(3, dtype=torch.float64), "out_offset"),
        4: (torch.zeros(4, dtype=torch.int32), "slots"),
        5: (torch.zeros(1, 1, 7, 3), "mat must be"),
        6: (torch.zeros(1, 10, dtype=torch.float64), "vec must be"),
    }
    for i, (value, message) in bad.items():
        args = list(good)
        args[i] = value
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    with pytest.raises(RuntimeError, match="groups"):
        torch.ops.untangle_ext.accumulate_conv2d(
            torch.randn(2, 4, 5, 5), torch.randn(3, 2, 3, 3), torch.zeros(4), torch.zeros(3, dtype=torch.float64),
            torch.zeros(2, dtype=torch.long), torch.zeros(1, 2, 4, 18, dtype=torch.float64),
            torch.zeros(1, 16, dtype=torch.float64), [1, 1], [0, 0], [1, 1], 2)
    with pytest.raises(RuntimeError, match="patterns dtype"):
        torch.ops.untangle_ext.pattern_backward_linear(
            torch.randn(3, 2), torch.randn(2, 2, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long))


@needs_native
def test_compiles_without_graph_breaks():
    args, _ = pattern_case(1, "linear", torch.float32, "cpu")
    fn = torch.compile(lambda g, p, s: ops.pattern_backward_linear(g, p, s) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(*args), 2 * _reference.pattern_backward_linear(*args))


# ---------------------------------------------------------------- backend selection
def test_backend_selection(monkeypatch):
    def broken():
        raise RuntimeError("no library here")

    monkeypatch.setattr(ops, "_load_native", broken)
    monkeypatch.delenv("UNTANGLE_EXT_BACKEND", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info, devices = ops._select()
    assert info.name == "torch" and "no library here" in info.reason and not devices
    assert len([w for w in caught if "PyTorch backend" in str(w.message)]) == 1
    monkeypatch.setenv("UNTANGLE_EXT_BACKEND", "native")
    with pytest.raises(RuntimeError, match="UNTANGLE_EXT_BACKEND=native"):
        ops._select()
    monkeypatch.setenv("UNTANGLE_EXT_BACKEND", "torch")
    assert ops._select()[0] == ops.BackendInfo("torch", "forced by UNTANGLE_EXT_BACKEND=torch")
    monkeypatch.setenv("UNTANGLE_EXT_BACKEND", "fast")
    with pytest.raises(ValueError, match="not understood"):
        ops._select()


# ---------------------------------------------------------------- numerics (SPEC §2)
def _two_pass_patterns(xs: torch.Tensor, ys: torch.Tensor, w: torch.Tensor):
    """a_lin and a_pos (eq. 4 and 8, E[y] over all samples) from centred float64 data."""
    xc, yc = xs - xs.mean(0), ys - ys.mean(0)
    cov = xc.t() @ yc / xs.shape[0]  # (D, K)
    pos = (ys > 0).double()
    # E+[x y] - E+[x] E[y] = E+[x (y - E y)] = E+[xc (y - E y)] + E[x] E+[y - E y]
    cov_pos = ((xc.t() @ (pos * yc)) + xs.mean(0).unsqueeze(1) * (pos * yc).sum(0)) / pos.sum(0)
    norm = lambda c: (c / (w * c.t()).sum(1)).t()  # noqa: E731
    return norm(cov), norm(cov_pos)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_large_mean_patterns_within_1e6_of_two_pass(kind, impl, monkeypatch):
    torch.manual_seed(0)
    if kind == "linear":
        model = torch.nn.Sequential(torch.nn.Linear(6, 4))
        data = 1e3 + torch.randn(3, 200, 6) * torch.linspace(0.5, 1.0, 6)
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(75, 2))
        # 200 positions per batch: fp32 GEMM sums over many more rows drift past 1e-6
        # (measured 1.9e-6 at 1000 positions per batch, same for both backends)
        data = 1e3 + torch.randn(12, 8, 2, 5, 5)
    with torch.no_grad():  # centre the outputs so that they straddle zero despite the large input mean
        out = model[0](data[0])
        model[0].bias -= out.mean([0, 2, 3] if out.dim() == 4 else [0])
    program = Program(model)
    monkeypatch.setattr(ops, f"accumulate_{kind}", getattr(IMPLS[impl], f"accumulate_{kind}"))
    moments = Moments(program, 1)
    for batch in data:
        moments.update(batch, torch.zeros(batch.shape[0], dtype=torch.long))
    layer = program.layers[0]
    got = compute_patterns(moments.layers[layer.name], 0)
    xs = data.reshape(-1, *data.shape[2:]).double()
    w = layer.weight.double().reshape(layer.out_features, -1)
    if kind == "linear":
        ys = xs @ w.t() + layer.bias.double()
    else:
        xs = F.unfold(xs, 3, padding=1).transpose(1, 2).reshape(-1, w.shape[1])
        ys = xs @ w.t() + layer.bias.double()
    a_lin, a_pos = _two_pass_patterns(xs, ys, w)
    for name, want in (("a_lin", a_lin), ("a_pos", a_pos)):
        have = got[name].reshape(want.shape)
        rel = ((have - want).abs().max() / want.abs().max()).item()
        assert rel < 1e-6, f"{name}: relative error {rel:.2e}"
