"""Does a native build of ``untangle_ext._C`` fit the running torch, CUDA and GPU? Pure functions, no torch.

setup.py loads this file by path to settle the CUDA architectures it compiles for (PTX for the
newest one, so newer GPU generations can JIT it); :mod:`untangle_ext.ops` uses it to refuse a build
that does not fit, with the cause and the rebuild command. The library describes itself through
the op ``build_info()`` (csrc/common.cpp): ``key=value`` pairs joined by ``;`` — ``torch``
(the version it was compiled against), ``cuda`` (empty without CUDA kernels), ``archs`` (the
compute capabilities it has machine code for, e.g. ``80,90``) and ``ptx`` (the newest one it
carries PTX for, 0 for none).
"""
from __future__ import annotations

import re
from typing import Optional

#: The architectures setup.py builds for when TORCH_CUDA_ARCH_LIST is unset (Ampere, Hopper + PTX).
DEFAULT_ARCHS = "8.0;9.0"
REBUILD = "pip install --no-build-isolation -e ."
_ARCH = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def _parse(spec: str) -> list[tuple[int, int, str, bool]]:
    """Entries of a TORCH_CUDA_ARCH_LIST ('8.0;9.0+PTX', also space-separated) as (major, minor, suffix, ptx)."""
    entries = []
    for token in spec.replace(" ", ";").split(";"):
        if not token:
            continue
        m = _ARCH.match(token)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {token!r} is not of the form X.Y or X.Y+PTX; "
                             f"use compute capabilities, e.g. TORCH_CUDA_ARCH_LIST=\"{DEFAULT_ARCHS}\"")
        entries.append((int(m.group(1)), int(m.group(2)), m.group(3), bool(m.group(4))))
    if not entries:
        raise ValueError("TORCH_CUDA_ARCH_LIST is empty; set it to the GPUs' compute capabilities, "
                         f"e.g. \"{DEFAULT_ARCHS}\"")
    return entries


def with_ptx(spec: Optional[str]) -> str:
    """``spec`` (default DEFAULT_ARCHS) with ``+PTX`` on its newest architecture, so newer GPUs can JIT it."""
    entries = _parse(spec or DEFAULT_ARCHS)
    newest = max(entries, key=lambda e: (e[0], e[1]))
    return ";".join(f"{a}.{b}{s}{'+PTX' if p or (a, b, s) == newest[:3] else ''}" for a, b, s, p in entries)


def ptx_arch(spec: str) -> int:
    """The newest architecture of ``spec`` that carries PTX, as 10·major + minor (0: none)."""
    return max((10 * a + b for a, b, _, p in _parse(spec) if p), default=0)


def parse_info(text: str) -> dict[str, str]:
    """The ``build_info()`` string as a dict."""
    return dict(item.split("=", 1) for item in text.split(";") if "=" in item)


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", version.split("+")[0])[:2])


def _cap(arch: int) -> str:
    return f"{arch // 10}.{arch % 10}"


def covers(archs: list[int], ptx: int, capability: tuple[int, int]) -> bool:
    """Whether a GPU of ``capability`` runs the build: machine code of its major version and a minor
    at most its own, or PTX of an architecture at most its own (the driver compiles it)."""
    cap = 10 * capability[0] + capability[1]
    return any(a // 10 == capability[0] and a <= cap for a in archs) or 0 < ptx <= cap


def problems(info: dict[str, str], torch_version: str, torch_cuda: Optional[str],
             capability: Optional[tuple[int, int]] = None) -> list[str]:
    """Why the build described by ``info`` does not fit the running torch (and the GPU of
    ``capability``, for CUDA tensors); empty when it fits."""
    found = []
    built_torch = info.get("torch", "")
    if _major_minor(built_torch) != _major_minor(torch_version):
        found.append(f"it was compiled against torch {built_torch or '(unknown)'}, but torch {torch_version} is running")
    built_cuda = info.get("cuda", "")
    if capability is None:
        return found
    if not built_cuda:
        found.append("it was built without CUDA kernels (torch without CUDA, no nvcc, or UNTANGLE_EXT_NO_CUDA=1)")
        return found
    if torch_cuda and _major_minor(built_cuda)[:1] != _major_minor(torch_cuda)[:1]:
        found.append(f"it was compiled with CUDA {built_cuda}, but torch runs CUDA {torch_cuda}")
    archs = [int(a) for a in info.get("archs", "").split(",") if a.strip().isdigit()]
    ptx = int(info.get("ptx", "0") or 0)
    if not covers(archs, ptx, capability):
        built = ", ".join(f"sm_{a}" for a in archs) or "none"
        found.append(f"the GPU's compute capability {capability[0]}.{capability[1]} is not covered: machine code "
                     f"for {built}, PTX {'for ' + _cap(ptx) if ptx else 'none'}")
    return found


def rebuild_hint(capability: Optional[tuple[int, int]] = None) -> str:
    """The command that rebuilds the extension for this torch (and this GPU)."""
    archs = f"TORCH_CUDA_ARCH_LIST=\"{capability[0]}.{capability[1]}\" " if capability else ""
    return f"rebuild it with `{archs}{REBUILD}` in the source tree"
