"""The engine's hot operations; the only module that knows which backend runs them.

Everything above this layer calls ``ops.*`` and never branches on the backend.
The native backend is the ``untangle_ext._C`` library built by setup.py; when it is
missing, it is JIT-built once with ``torch.utils.cpp_extension.load`` (cached under
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/untangle_ext``); when that fails too,
the pure-PyTorch engine (:mod:`untangle_ext._reference`) runs, with one warning.
``UNTANGLE_EXT_BACKEND=torch|native`` forces a backend; ``backend()`` says which runs and why.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import _reference

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
    path = cpp_extension.load(
        name="untangle_ext_jit", sources=sources, extra_cflags=["-O3", "-g0", "-fopenmp"],
        extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3"], with_cuda=with_cuda,
        is_python_module=False, verbose=False,
    )
    if isinstance(path, str):  # older torch returns the path instead of loading it
        torch.ops.load_library(path)
    return f"JIT-built with cpp_extension.load (cache: {os.environ['TORCH_EXTENSIONS_DIR']})"


#: The ops every native build must provide (schemas in csrc/ops.cpp).
#: layer_patterns (csrc/patterns.cpp) has a CPU kernel only: CUDA tensors take its PyTorch code (see _route).
OPS = ("accumulate_linear", "accumulate_conv", "pattern_backward_linear", "pattern_backward_conv", "layer_patterns")


def _check_ops() -> None:
    """Raise when the loaded library lacks an op (built from older sources)."""
    missing = [name for name in OPS if not hasattr(torch.ops.untangle_ext, name)]
    if missing:
        raise RuntimeError(f"the loaded library lacks the ops {missing}: it was built from older sources; rebuild it "
                           "with `pip install --no-build-isolation -e .`")


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

    @torch.library.register_fake("untangle_ext::pattern_backward_linear")
    def _(grad_out, patterns, slots):
        return grad_out.new_empty((grad_out.shape[0], patterns.shape[2]))

    @torch.library.register_fake("untangle_ext::pattern_backward_conv")
    def _(grad_out, patterns, slots, input_size, stride, padding, dilation, groups):
        return grad_out.new_empty((grad_out.shape[0], patterns.shape[2] * groups, *input_size))

    @torch.library.register_fake("untangle_ext::layer_patterns")
    def _(sums, vec, weight, shift, positive_mean_y, dtype):
        a = weight.new_empty(weight.shape, dtype=dtype)
        return a, torch.empty_like(a), torch.empty_like(a), sums.new_empty((3, weight.shape[0]))


def _native_devices() -> frozenset:
    """Device types the loaded library has kernels for (a CPU-only build leaves CUDA to PyTorch)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(d.lower() for d in ("CPU", "CUDA") if has("untangle_ext::accumulate_linear", d))


def _select() -> tuple[BackendInfo, frozenset]:
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced not in ("", "torch", "native"):
        raise ValueError(f"{_ENV}={forced!r} is not understood; use 'torch' or 'native' (or unset it)")
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


def _route(name: str) -> Callable:
    """The native op for tensors on a device it has kernels for (this op's own), else the PyTorch one."""
    reference = getattr(_reference, name)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    devices = frozenset(d for d in _NATIVE_DEVICES if has(f"untangle_ext::{name}", d.upper()))
    if not devices:
        return reference
    native = getattr(torch.ops.untangle_ext, name)

    def op(first: torch.Tensor, *args):
        return native(first, *args) if first.device.type in devices else reference(first, *args)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = reference.__doc__
    return op


accumulate_linear, accumulate_conv, pattern_backward_linear, pattern_backward_conv, layer_patterns = map(_route, OPS)
