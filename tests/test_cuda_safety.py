"""The CUDA path made safe to run: build/GPU compatibility, loud failures, bounded scratch, slot offsets.

Everything that needs no GPU runs here on the CPU (the compatibility rules as pure functions with
fake inputs, the refusal to fall back for CUDA tensors, the row chunks and the slot-order cache of
the device-generic driver); the tests at the end need a CUDA GPU (``make gpu-check`` runs them).
"""
from __future__ import annotations

import os
import types

import pytest
import torch

from untangle_ext import _native_build as nb
from untangle_ext import _reference, ops

NATIVE = ops.backend().name == "native"
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native backend unavailable: {ops.backend().reason}")
needs_gpu = pytest.mark.skipif(not (NATIVE and torch.cuda.is_available()), reason="needs a CUDA GPU and the native build")

INFO = {"torch": "2.14.1", "cuda": "13.0", "archs": "80,90", "ptx": "90"}


# ---------------------------------------------------------------- pure rules (no GPU)
@pytest.mark.parametrize("spec, want", [
    (None, "8.0;9.0+PTX"),
    ("8.0;9.0", "8.0;9.0+PTX"),
    ("9.0;8.0", "9.0+PTX;8.0"),
    ("8.0 8.6", "8.0;8.6+PTX"),
    ("7.5;9.0+PTX", "7.5;9.0+PTX"),
    ("8.0+PTX;9.0a", "8.0+PTX;9.0a+PTX"),
    ("12.0", "12.0+PTX"),
])
def test_newest_arch_gets_ptx(spec, want):
    assert nb.with_ptx(spec) == want
    assert nb.ptx_arch(want) == max(10 * int(e.split(".")[0]) + int(e.split(".")[1][0]) for e in want.split(";")
                                    if e.endswith("+PTX"))


@pytest.mark.parametrize("spec", ["Ampere", "8", "8.0;sm_90", ";"])
def test_bad_arch_list_is_named(spec):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        nb.with_ptx(spec)


@pytest.mark.parametrize("capability, ok", [
    ((8, 0), True), ((8, 6), True), ((8, 9), True),  # sm_80 machine code runs on later 8.x
    ((9, 0), True), ((10, 0), True), ((12, 0), True),  # newer generations JIT the 9.0 PTX
    ((7, 5), False), ((7, 0), False),  # older than every build target
])
def test_capability_coverage(capability, ok):
    assert nb.covers([80, 90], 90, capability) is ok
    assert (not nb.problems(INFO, "2.14.1+cu130", "13.0", capability)) is ok
    if not ok:
        assert f"{capability[0]}.{capability[1]} is not covered" in nb.problems(INFO, "2.14.1", "13.0", capability)[0]


def test_without_ptx_a_newer_gpu_is_not_covered():
    assert not nb.covers([80, 90], 0, (10, 0))
    assert nb.covers([80, 90], 0, (9, 0))


@pytest.mark.parametrize("info, torch_version, torch_cuda, capability, message", [
    ({**INFO, "torch": "2.13.0"}, "2.14.1+cu130", "13.0", None, "compiled against torch 2.13.0, but torch 2.14.1"),
    ({**INFO, "cuda": "12.8"}, "2.14.1", "13.0", (9, 0), "compiled with CUDA 12.8, but torch runs CUDA 13.0"),
    ({**INFO, "cuda": "", "archs": "", "ptx": "0"}, "2.14.1", "13.0", (9, 0), "built without CUDA kernels"),
    ({**INFO, "archs": "80", "ptx": "0"}, "2.14.1", "13.0", (9, 0), "9.0 is not covered: machine code for sm_80, "
                                                                    "PTX none"),
])
def test_problems_name_the_cause(info, torch_version, torch_cuda, capability, message):
    found = nb.problems(info, torch_version, torch_cuda, capability)
    assert len(found) == 1 and message in found[0], found


def test_fitting_build_has_no_problems():
    assert nb.problems(INFO, "2.14.0", "13.1", (9, 0)) == []  # patch and CUDA minor versions may differ
    assert nb.problems({**INFO, "cuda": ""}, "2.14.1", None) == []  # a CPU build is fine for CPU tensors
    assert nb.parse_info("torch=2.14.1;cuda=13.0;archs=80,90;ptx=90") == INFO
    assert nb.rebuild_hint((8, 6)) == 'rebuild it with `TORCH_CUDA_ARCH_LIST="8.6" pip install --no-build-isolation ' \
                                      '-e .` in the source tree'


# ---------------------------------------------------------------- CUDA tensors never fall back silently
def _fake_gpu(monkeypatch, capability=(9, 0), info=None, backend=None):
    """Pretend a GPU of ``capability`` and a loaded build described by ``info``."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(ops, "_build_info", lambda: dict(info or INFO))
    monkeypatch.setattr(ops, "_BACKEND", backend or ops.BackendInfo("native", "test"))
    monkeypatch.setattr(ops, "_CUDA_READY", set())
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")


@pytest.mark.parametrize("capability, info, backend, cause", [
    ((7, 5), None, None, "7.5 is not covered"),
    ((9, 0), {**INFO, "cuda": ""}, None, "built without CUDA kernels"),
    ((9, 0), None, ops.BackendInfo("torch", "no untangle_ext._C in this install"), "native extension is not loaded"),
])
def test_unfit_build_refuses_cuda_tensors(monkeypatch, capability, info, backend, cause):
    _fake_gpu(monkeypatch, capability, info, backend)
    monkeypatch.setattr(ops, "_NATIVE_DEVICES", frozenset())  # CPU calls go to the (recording) PyTorch op
    monkeypatch.delenv("UNTANGLE_EXT_BACKEND", raising=False)
    calls = []
    monkeypatch.setattr(_reference, "accumulate_linear", lambda *a: calls.append(a))
    op = ops._route("accumulate_linear")
    fake_cuda = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match=f"cannot run on cuda:0: .*{cause}.*Fix: rebuild it with "
                                           f"`TORCH_CUDA_ARCH_LIST=\"{capability[0]}.{capability[1]}\" pip install "
                                           r"--no-build-isolation -e \.`.*UNTANGLE_EXT_BACKEND=torch"):
        op(fake_cuda)
    assert not calls, "a CUDA tensor fell back to the PyTorch op"
    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    op(cpu)  # CPU tensors are not affected
    assert len(calls) == 1


def test_fitting_build_checks_each_device_once(monkeypatch):
    _fake_gpu(monkeypatch, (8, 6))
    ops._check_cuda(torch.device("cuda", 0))
    monkeypatch.setattr(ops, "_build_info", lambda: pytest.fail("checked twice"))
    ops._check_cuda(torch.device("cuda", 0))
    assert ops._CUDA_READY == {0}


def test_forced_torch_backend_runs_cuda_tensors_on_pytorch(monkeypatch):
    monkeypatch.setenv("UNTANGLE_EXT_BACKEND", "torch")
    assert ops._route("accumulate_conv") is _reference.accumulate_conv


def test_jit_build_adds_ptx_and_restores_the_environment(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    with ops._cuda_arch_list() as ptx:
        assert ptx == 86 and os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6+PTX"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(9, 0), (8, 0)][i])
    with ops._cuda_arch_list() as ptx:  # no list given: the visible GPUs', PTX for the newest
        assert ptx == 90 and os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ


def test_older_torch_build_is_refused_at_load(monkeypatch):
    if not NATIVE:
        pytest.skip("native backend unavailable")
    monkeypatch.setattr(ops, "_build_info", lambda: {**INFO, "torch": "1.13.1"})
    with pytest.raises(RuntimeError, match=r"compiled against torch 1\.13\.1.*pip install --no-build-isolation"):
        ops._check_ops()


@needs_native
def test_build_describes_itself():
    info = nb.parse_info(torch.ops.untangle_ext.build_info())
    assert nb.problems(info, torch.__version__, torch.version.cuda) == []
    assert info["torch"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("untangle_ext::accumulate_linear", "CUDA")
    assert bool(info["cuda"]) == has_cuda
    if has_cuda:
        assert int(info["ptx"]) == max(int(a) for a in info["archs"].split(","))


# ---------------------------------------------------------------- row chunks and the slot-order cache
def _linear(n, d, k, num_slots, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) + 1).to(dtype).to(device)
    w = torch.randn(k, d, generator=g).to(dtype).to(device)
    slots = torch.randint(-1, num_slots + 1, (n,), generator=g)
    slots[: n // 2] = 0  # one slot with more than 64 rows: the blocked float32 product path
    return x, w, x.mean(0), torch.randn(k, generator=g, dtype=torch.float64).to(device), slots.to(device)


#: Stride, padding, dilation and groups of _conv's 3x3 layer, as _run passes them to the conv op.
CONV_GEOMETRY = [[1, 1], [1, 1], [1, 1], 1]


def _conv(n, num_slots, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 3, 10, 10, generator=g) + 2).to(dtype).to(device)
    w = torch.randn(8, 3, 3, 3, generator=g).to(dtype).to(device)
    slots = torch.randint(-1, num_slots + 1, (n,), generator=g).to(device)
    return x, w, x.mean([0, 2, 3]), torch.randn(8, generator=g, dtype=torch.float64).to(device), slots


def _run(impl, args, num_slots, geometry=None):
    x, w = args[0], args[1]
    k, dg = w.shape[0], w[0].numel()
    mat = torch.zeros(num_slots, 1, 3 * k + 1, dg, dtype=torch.float64, device=x.device)
    vec = torch.zeros(num_slots, 3 * k + 1, dtype=torch.float64, device=x.device)
    if geometry is None:
        z = impl.accumulate_linear(*args, mat, vec)
    else:
        z = impl.accumulate_conv(*args, mat, vec, *geometry)
    return z, mat, vec


def _assert_same(got, want, rtol):
    for a, b in zip(got, want):
        scale = max(1.0, b.abs().max().item())
        assert (a.double().cpu() - b.double().cpu()).abs().max().item() <= rtol * scale


@needs_native
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_row_chunks_match_the_reference(monkeypatch, kind, dtype, rtol):
    """A 1 MiB scratch limit splits these batches into several row chunks; the sums must not change."""
    monkeypatch.setenv("UNTANGLE_EXT_SCRATCH_MB", "1")
    if kind == "linear":  # ~9 KB per row: 116 rows per chunk
        args, geometry, num_slots = _linear(300, 2048, 50, 3, seed=1, dtype=dtype), None, 3
    else:  # ~9.6 KB per row: 108 rows per chunk
        args, geometry, num_slots = _conv(250, 4, seed=2, dtype=dtype), CONV_GEOMETRY, 4
    want = _run(_reference, [a.double() if a.is_floating_point() else a for a in args], num_slots, geometry)
    _assert_same(_run(torch.ops.untangle_ext, args, num_slots, geometry), want, rtol)


@needs_native
def test_float64_cpu_windows_match_the_reference():
    """Float64 work on the CPU runs in 4 MiB windows of rows (~30 KB per row here: 3 windows); the sums must not change."""
    args = _conv(400, 4, seed=4)
    want = _run(_reference, args, 4, CONV_GEOMETRY)
    _assert_same(_run(torch.ops.untangle_ext, args, 4, CONV_GEOMETRY), want, 1e-11)


@needs_native
def test_bad_scratch_limit_is_named(monkeypatch):
    monkeypatch.setenv("UNTANGLE_EXT_SCRATCH_MB", "lots")
    with pytest.raises(RuntimeError, match="UNTANGLE_EXT_SCRATCH_MB must be a positive number of MiB"):
        _run(torch.ops.untangle_ext, _conv(4, 2, seed=3), 2, CONV_GEOMETRY)


@needs_native
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_slot_order_cache_sees_in_place_changes(device):
    """The slot order is cached per slots tensor; changing the tensor in place must invalidate it."""
    args = list(_conv(12, 3, seed=4, device=device))
    geometry = CONV_GEOMETRY
    slots = args[4]
    first = _run(torch.ops.untangle_ext, args, 3, geometry)  # fills the cache
    _assert_same(_run(torch.ops.untangle_ext, args, 3, geometry), first, 0)  # a hit: same numbers
    slots[:6] = (slots[:6] + 1) % 3
    _assert_same(_run(torch.ops.untangle_ext, args, 3, geometry), _run(_reference, args, 3, geometry), 1e-11)


# ---------------------------------------------------------------- on a GPU
@needs_gpu
def test_cuda_more_slots_than_a_grid_dimension():
    """70,000 slots exceed gridDim.y (65,535): the per-slot sums loop instead of launching an invalid grid."""
    n, num_slots = 64, 70_000
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    slots = torch.randint(0, num_slots, (n,), generator=g)
    slots[:4] = num_slots - 1  # rows in slots beyond the first 65,535
    args = [x, w, torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), slots]
    want = _run(_reference, args, num_slots)
    _assert_same(_run(torch.ops.untangle_ext, [a.cuda() for a in args], num_slots), want, 1e-11)


def _warm_cuda_conv(n: int, seed: int) -> list:
    """A float32 conv batch on the GPU after one native call on it (slot order cached, kernels loaded), synchronised."""
    args = [a.cuda() for a in _conv(n, 4, seed=seed, dtype=torch.float32)]
    _run(torch.ops.untangle_ext, args, 4, CONV_GEOMETRY)
    torch.cuda.synchronize()
    return args


@needs_gpu
def test_cuda_layers_after_the_first_do_not_sync():
    """Same slots tensor (as every layer of a batch gets): only the first call reads offsets on the host."""
    args = _warm_cuda_conv(32, seed=6)
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(torch.ops.untangle_ext, args, 4, CONV_GEOMETRY)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
def test_cuda_scratch_is_returned_to_the_caching_allocator():
    """No scratch outlives a call (it comes from PyTorch's allocator), beyond the cached slot order."""
    args = _warm_cuda_conv(64, seed=7)
    before = torch.cuda.memory_allocated()
    z, mat, vec = _run(torch.ops.untangle_ext, args, 4, CONV_GEOMETRY)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before - sum(t.numel() * t.element_size() for t in (z, mat, vec))
    assert held <= 64 << 10, f"{held} bytes held after the call"


@needs_gpu
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cuda_row_chunks_match_the_reference(monkeypatch, kind):
    monkeypatch.setenv("UNTANGLE_EXT_SCRATCH_MB", "1")
    if kind == "linear":
        args, geometry, num_slots = _linear(300, 2048, 50, 3, seed=8, dtype=torch.float32), None, 3
    else:
        args, geometry, num_slots = _conv(250, 4, seed=9, dtype=torch.float32), CONV_GEOMETRY, 4
    want = _run(_reference, [a.double() if a.is_floating_point() else a for a in args], num_slots, geometry)
    _assert_same(_run(torch.ops.untangle_ext, [a.cuda() for a in args], num_slots, geometry), want, 2e-5)
