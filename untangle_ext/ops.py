"""The engine's hot operations; the only module that knows which backend runs them.

Everything above this layer calls ``ops.*`` and never branches on the backend.
Moment accumulation has native kernels; the pattern backward is ATen everywhere.
The native backend is the ``untangle_ext._C`` library built by setup.py; when it is
missing, it is JIT-built once with ``torch.utils.cpp_extension.load`` (cached under
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/untangle_ext``); when that fails too,
the pure-PyTorch engine (:mod:`untangle_ext._reference`) runs, with one warning.
``UNTANGLE_EXT_BACKEND=torch|native`` forces a backend; ``backend()`` says which runs and why.

CUDA tensors never fall back silently: unless the PyTorch backend is forced, they need a loaded
build with CUDA kernels that fits the running torch, CUDA and GPU (checked once per device by
:mod:`untangle_ext._native_build`), else the op raises with the cause and the rebuild command.
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from . import _native_build, _reference

_ENV = "UNTANGLE_EXT_BACKEND"
_CSRC = Path(__file__).resolve().parent.parent / "csrc"


@dataclass(frozen=True)
class BackendInfo:
    """Which implementation runs the ops, and why it was chosen."""

    name: str
    reason: str


def _load_built() -> Optional[str]:
    """Load the ``_C`` library built by setup.py; None when absent, raise when it is unusable."""
    spec = importlib.util.find_spec("untangle_ext._C")
    if spec is None or not spec.origin:
        return None
    torch.ops.load_library(spec.origin)  # a CUDA build in a CPU-only torch raises OSError here
    return f"extension built by setup.py ({Path(spec.origin).name})"


def _jit_build() -> str:
    """Compile the kernels with cpp_extension.load + ninja into a per-user cache, and load them."""
    from torch.utils import cpp_extension

    if not _CSRC.is_dir():
        raise RuntimeError("no csrc/ sources next to the package to JIT-build from")
    if shutil.which("ninja") is None:
        raise RuntimeError("ninja is not installed (pip install ninja)")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "untangle_ext"))
    sources = sorted(str(p) for p in [*_CSRC.glob("*.cpp"), *_CSRC.glob("cpu/*.cpp")])
    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += sorted(str(p) for p in _CSRC.glob("cuda/*.cu"))
    with _cuda_arch_list() as archs:
        path = cpp_extension.load(
            name="untangle_ext_jit", sources=sources, extra_cflags=["-O3", "-g0", "-fopenmp"],
            extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3", f"-DUNTANGLE_EXT_PTX_ARCH={archs}"],
            with_cuda=with_cuda, is_python_module=False, verbose=False,
        )
    if isinstance(path, str):  # older torch returns the path instead of loading it
        torch.ops.load_library(path)
    return f"JIT-built with cpp_extension.load (cache: {os.environ['TORCH_EXTENSIONS_DIR']})"


@contextmanager
def _cuda_arch_list() -> Iterator[int]:
    """TORCH_CUDA_ARCH_LIST for a JIT build (the given one, else the visible GPUs'), with PTX for
    its newest entry; yields that entry as 10·major + minor (0 without a GPU)."""
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    if not old and not caps:
        yield 0
        return
    spec = _native_build.with_ptx(old or ";".join(f"{a}.{b}" for a, b in caps))
    os.environ["TORCH_CUDA_ARCH_LIST"] = spec
    try:
        yield _native_build.ptx_arch(spec)
    finally:
        if old is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


#: The ops every native build must provide (schemas in csrc/ops.cpp).
#: layer_patterns (csrc/patterns.cpp) has a CPU kernel only: on CUDA tensors its PyTorch code is the implementation.
OPS = ("accumulate_linear", "accumulate_conv", "layer_patterns")


def _check_ops() -> None:
    """Raise when the loaded library lacks an op (built from older sources) or was built for another torch."""
    missing = [name for name in (*OPS, "build_info") if not hasattr(torch.ops.untangle_ext, name)]
    if missing:
        raise RuntimeError(f"the loaded library lacks the ops {missing}: it was built from older sources; "
                           f"{_native_build.rebuild_hint()}")
    found = _native_build.problems(_build_info(), torch.__version__, torch.version.cuda)
    if found:
        raise RuntimeError(f"the loaded library does not fit: {'; '.join(found)}; {_native_build.rebuild_hint()}")


def _build_info() -> dict[str, str]:
    """What the loaded library was built with and for (csrc/common.cpp ``build_info``)."""
    return _native_build.parse_info(torch.ops.untangle_ext.build_info())


def _load_native() -> str:
    """Load the native library by the first route that works; raise with every route's reason."""
    errors = []
    for route in (_load_built, _jit_build):
        try:
            how = route()
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next route
            errors.append(f"{route.__name__.strip('_')}: {type(exc).__name__}: {str(exc).strip()[:300]}")
            continue
        if how is not None:
            _check_ops()  # a loaded library cannot be replaced by another route in this process
            return how
        errors.append(f"{route.__name__.strip('_')}: no untangle_ext._C in this install")
    raise RuntimeError("; ".join(errors))


def _register_fakes() -> None:
    """Shape-only implementations so the ops work under FakeTensor, opcheck and torch.compile."""

    def conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
        return (size + 2 * p - d * (k - 1) - 1) // s + 1

    @torch.library.register_fake("untangle_ext::accumulate_linear")
    def _(x, weight, shift_x, out_offset, slots, mat, vec):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("untangle_ext::accumulate_conv")
    def _(x, weight, shift_c, out_offset, slots, mat, vec, stride, padding, dilation, groups):
        size = [conv_out(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
                for i in range(len(stride))]
        return x.new_empty((x.shape[0], weight.shape[0], *size))

    @torch.library.register_fake("untangle_ext::layer_patterns")
    def _(sums, vec, weight, shift, positive_mean_y, dtype, keep=(True, True, True)):
        lin, pos, neg = (weight.new_empty(weight.shape if kept else (0,), dtype=dtype) for kept in keep)
        return lin, pos, neg, sums.new_empty((3, weight.shape[0]))


def _native_devices() -> frozenset:
    """Device types the loaded library has kernels for (a CPU-only build leaves CUDA to PyTorch)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(d.lower() for d in ("CPU", "CUDA") if has("untangle_ext::accumulate_linear", d))


def _forced() -> str:
    """The backend forced by the environment ('' when none is)."""
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced not in ("", "torch", "native"):
        raise ValueError(f"{_ENV}={forced!r} is not understood; use 'torch' or 'native' (or unset it)")
    return forced


def _select() -> tuple[BackendInfo, frozenset]:
    forced = _forced()
    if forced == "torch":
        return BackendInfo("torch", f"forced by {_ENV}=torch"), frozenset()
    try:
        how = _load_native()
    except RuntimeError as exc:
        if forced == "native":
            raise RuntimeError(
                f"{_ENV}=native was requested, but the native extension cannot be loaded ({exc}); "
                "rebuild it with `pip install --no-build-isolation -e .` or unset the variable"
            ) from None
        reason = f"native extension unavailable ({exc})"
        warnings.warn(f"untangle_ext: using the slower PyTorch backend: {reason}", RuntimeWarning, stacklevel=3)
        return BackendInfo("torch", reason), frozenset()
    _register_fakes()
    devices = _native_devices()
    return BackendInfo("native", f"{how}; kernels for {', '.join(sorted(devices))}"), devices


_BACKEND, _NATIVE_DEVICES = _select()


def backend() -> BackendInfo:
    """Report the active backend (``name`` is 'torch' or 'native') and why it is active."""
    return _BACKEND


_CUDA_READY: set[int] = set()


def _check_cuda(device: torch.device) -> None:
    """Raise unless the native CUDA kernels can run on ``device`` (checked once per device):
    CUDA tensors never fall back silently to the PyTorch ops."""
    if device.index in _CUDA_READY:
        return
    capability = torch.cuda.get_device_capability(device)
    if _BACKEND.name != "native":
        found = [f"the native extension is not loaded ({_BACKEND.reason})"]
    else:
        found = _native_build.problems(_build_info(), torch.__version__, torch.version.cuda, capability)
    if found:
        raise RuntimeError(
            f"untangle_ext: the native CUDA kernels cannot run on {device}: {'; '.join(found)}. "
            f"Fix: {_native_build.rebuild_hint(capability)}, or set {_ENV}=torch to run the slower PyTorch ops "
            "on the GPU instead")
    _CUDA_READY.add(device.index)


def _route(name: str) -> Callable:
    """The native op for tensors on a device it has kernels for (this op's own), else the PyTorch one;
    CUDA tensors need a build that fits the GPU unless the PyTorch backend is forced (see _check_cuda)."""
    reference = getattr(_reference, name)
    if _forced() == "torch":
        return reference
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    devices = frozenset(d for d in _NATIVE_DEVICES if has(f"untangle_ext::{name}", d.upper()))
    native = getattr(torch.ops.untangle_ext, name) if devices else reference

    def op(first: torch.Tensor, *args):
        device = first.device
        if device.type == "cuda":
            _check_cuda(device)
        return native(first, *args) if device.type in devices else reference(first, *args)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = reference.__doc__
    return op


accumulate_linear, accumulate_conv, layer_patterns = map(_route, OPS)
# The batched pattern backward is ATen on every device (a native version did not pay: measured no
# faster on VGG-style attribution), so it needs no routing.
pattern_backward_linear, pattern_backward_conv = _reference.pattern_backward_linear, _reference.pattern_backward_conv
