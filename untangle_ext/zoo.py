"""The model zoo check: every torchvision classification builder explained end to end.

``python -m untangle_ext.zoo`` (``make zoo``) builds each builder of
``torchvision.models`` (``weights=None``, ``num_classes=10``, seeded random init,
eval mode) at the smallest input size it accepts, estimates two classes on 32
generated images, attributes 4 images with every method, checks that all maps
are finite, that ``method="gradient"`` equals ``torch.autograd`` in a float64 run
(normwise relative error ≤ 1e-9) and that the model is unchanged. Each model runs
in its own subprocess under a timeout and a memory guard; the results go to
``benchmarks/results/zoo.json`` and ``docs/zoo.md``.
:func:`check_model` is the same check for one model (the tests use it on tiny ones).
"""
from __future__ import annotations

import argparse
import copy
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ._io import atomic_write
from .attribution import METHODS, Attributor
from .estimator import SignalEstimator

TORCHVISION_HINT = "install it with `.venv/bin/pip install --no-deps torchvision==0.28.0` (what `make venv` does)"
GRADIENT_TOLERANCE = 1e-9
ZOO_CLASSES = (0, 1)
NUM_CLASSES = 10
BASE_SIZE = 64
# Sizes tried in order until the model builds and runs; ViT-*/14 needs a multiple of 14,
# Inception-v3 at least 75 px, MaxViT a multiple of 224 (its partition size 7 at stride 32).
SIZE_CANDIDATES = (64, 70, 75, 96, 112, 128, 160, 192, 224)
# Families whose builder takes the image size (their positional embeddings / grids depend on it).
SIZE_KWARG = {"vision_transformer": "image_size", "maxvit": "input_size"}
# Peak bytes per weight of check_model, which estimates class by class: one class of float64 accumulators
# (Σx·yᵀ, Σ⁺x, Σ⁺x·y: 24 B), the float32 model, pattern transients and snapshots (BYTES_PER_WEIGHT), plus
# each finished class's three float32 patterns (BYTES_PER_WEIGHT_PER_CLASS).
BYTES_PER_WEIGHT_PER_CLASS = 12
BYTES_PER_WEIGHT = 40

_torchvision_stub: Optional[torch.library.Library] = None


class StageError(RuntimeError):
    """A zoo check failed at ``stage`` (build, estimate, <method>, finite, gradient, unchanged)."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


# --------------------------------------------------------------------------------------------- torchvision

def _torchvision_ops_load(spec: importlib.machinery.ModuleSpec) -> bool:
    """Whether torchvision's compiled ops (``_C``) load into this torch build."""
    for folder in spec.submodule_search_locations or ():
        finder = importlib.machinery.FileFinder(
            folder, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
        found = finder.find_spec("_C")
        if found is not None and found.origin:
            try:
                torch.ops.load_library(found.origin)
                return True
            except OSError:
                return False
    return False


def import_torchvision() -> ModuleType:
    """``import torchvision``, also where its ops do not load (its CUDA wheel in a CPU torch).

    The registry serves only torchvision's CUDA build for torch 2.13; in a CPU torch its ``_C``
    fails to load and ``import torchvision`` then fails on ``torchvision::nms``. The classification
    models never call nms/qnms, so their schemas are defined (with a warning) to let the import
    finish; detection ops stay unavailable.
    """
    global _torchvision_stub
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise ImportError(f"torchvision is not installed: {TORCHVISION_HINT}")
    if _torchvision_stub is None and not _torchvision_ops_load(spec):
        warnings.warn("torchvision's compiled ops do not load into this torch build (its CUDA wheel in a CPU "
                      "torch); defining the nms/qnms schemas so the classification models import. Detection "
                      "ops (nms, roi_align, ...) are unavailable.", RuntimeWarning, stacklevel=2)
        _torchvision_stub = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _torchvision_stub.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision
    return torchvision


def classification_models() -> list[str]:
    """Every classification builder name in ``torchvision.models`` (sorted)."""
    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models))


def family_of(name: str) -> str:
    """The torchvision module that defines builder ``name`` (``resnet``, ``vision_transformer``, ...)."""
    tv = import_torchvision()
    return tv.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]


# --------------------------------------------------------------------------------------------- the check

def class_images(n: int, shape: Sequence[int], classes: Sequence[int] = ZOO_CLASSES, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` generated inputs with labels cycling over ``classes``: noise plus a class-specific
    random-amplitude pattern along the last axis (class 0), the second-last (class 1), ..."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([classes[i % len(classes)] for i in range(n)])
    x = 0.5 * torch.randn((n, *shape), generator=g)
    amplitude = 1.0 + torch.rand((n,), generator=g)
    for slot, c in enumerate(classes):
        axis = len(shape) - 1 - (slot % len(shape))
        ramp = torch.linspace(-3.0, 3.0, shape[axis])
        wave_shape = [1] * len(shape)
        wave_shape[axis] = shape[axis]
        wave = torch.sin((slot + 1) * ramp).view(wave_shape)
        rows = labels == c
        x[rows] += amplitude[rows].view(-1, *[1] * len(shape)) * wave
    return x, labels


def snapshot(model: nn.Module, x: torch.Tensor) -> dict:
    """Everything a public call must leave alone: state, modes, hooks, and the eval-mode outputs."""
    with torch.no_grad():
        outputs = copy.deepcopy(model).eval()(x)
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "modes": [m.training for m in model.modules()],
        "grad_flags": [p.requires_grad for p in model.parameters()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     for m in model.modules()),
        "outputs": outputs,
    }


def unchanged_problem(model: nn.Module, before: dict, x: torch.Tensor) -> Optional[str]:
    """What differs between ``model`` now and ``before`` (a :func:`snapshot`), or ``None``."""
    after = snapshot(model, x)
    if after["state"].keys() != before["state"].keys():
        return "the state_dict keys changed"
    for k, v in before["state"].items():
        w = after["state"][k]
        if v.dtype != w.dtype or v.shape != w.shape or not torch.equal(v, w):
            return f"state_dict entry {k!r} changed"
    for what in ("modes", "grad_flags", "hooks"):
        if after[what] != before[what]:
            return f"the model's {what.replace('_', ' ')} changed"
    if not torch.equal(after["outputs"], before["outputs"]):
        return "the model's outputs changed"
    return None


def autograd_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d logit[target] / d input per image, by ``torch.autograd`` on an eval-mode copy of ``model``."""
    m = copy.deepcopy(model).eval()
    x = x.detach().clone().requires_grad_(True)
    m(x).gather(1, target.view(-1, 1)).sum().backward()
    return x.grad


def _stage(stage: str, fn: Callable):
    """Run ``fn()``; any exception becomes a :class:`StageError` naming ``stage`` and its first line."""
    try:
        return fn()
    except StageError:
        raise
    except Exception as exc:  # noqa: BLE001 - the zoo records every failure by stage
        first = (str(exc).strip().splitlines() or [""])[0]
        raise StageError(stage, f"{type(exc).__name__}: {first}"[:500]) from exc


def check_data(input_shape: Sequence[int], classes: Sequence[int] = ZOO_CLASSES, n_estimate: int = 32,
               n_attribute: int = 4, batch_size: int = 8, seed: int = 0) -> tuple[DataLoader, torch.Tensor, torch.Tensor]:
    """The data of :func:`check_model`: an estimation loader, inputs to attribute and their targets.
    The loader's data set knows its labels, so estimation goes class by class (one class of accumulators)."""
    x, labels = class_images(n_estimate, input_shape, classes, seed)
    x_attr, target = class_images(n_attribute, input_shape, classes, seed + 1)
    return DataLoader(TensorDataset(x, labels), batch_size=batch_size), x_attr, target


def gradient_error(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    """Normwise relative error of our float64 ``method="gradient"`` against ``torch.autograd``;
    a :class:`StageError` above :data:`GRADIENT_TOLERANCE`."""
    model64, x64 = copy.deepcopy(model).double(), x.double()
    ours = _stage("gradient", lambda: Attributor(model64).attribute(x64, target=target, method="gradient"))
    reference = autograd_gradient(model64, x64, target)
    error = float((ours - reference).norm() / reference.norm().clamp_min(torch.finfo(torch.float64).tiny))
    if not error <= GRADIENT_TOLERANCE:
        raise StageError("gradient", f"float64 gradient differs from torch.autograd: normwise relative error "
                                     f"{error:.3g} > {GRADIENT_TOLERANCE:g}")
    return error


def check_model(model: nn.Module, input_shape: Sequence[int], classes: Sequence[int] = ZOO_CLASSES, **data) -> dict:
    """Check the float64 gradient == autograd, estimate ``classes``, attribute with every method, check
    finiteness and that ``model`` is unchanged; returns the numbers, raises :class:`StageError`.
    ``data``: keyword arguments of :func:`check_data`."""
    loader, x_attr, target = check_data(input_shape, classes, **data)
    before = snapshot(model, x_attr)
    error = gradient_error(model, x_attr, target)  # first: its float64 copy is freed before the accumulators exist
    stores = _stage("estimate", lambda: SignalEstimator(model, classes=list(classes), progress=False).fit(loader))
    attributor = _stage("attribute", lambda: Attributor(model, stores))
    maps = {m: _stage(m, lambda m=m: attributor.attribute(x_attr, target=target, method=m)) for m in METHODS}
    bad = [m for m, a in maps.items() if a.shape != x_attr.shape or not torch.isfinite(a).all()]
    if bad:
        raise StageError("finite", "; ".join(
            f"{m} returned shape {tuple(maps[m].shape)}, {int((~torch.isfinite(maps[m])).sum())} non-finite" for m in bad))
    problem = unchanged_problem(model, before, x_attr)
    if problem:
        raise StageError("unchanged", problem)
    return {"gradient_error": error, "maps": maps, "stores": stores}


# --------------------------------------------------------------------------------------------- one zoo model

def build(name: str, size: int, seed: int = 0) -> nn.Module:
    """Builder ``name`` with ``weights=None``, 10 classes, seeded random init, for ``size`` px inputs, eval mode."""
    tv = import_torchvision()
    kwargs: dict = {"weights": None, "num_classes": NUM_CLASSES}
    size_kwarg = SIZE_KWARG.get(family_of(name))
    if size_kwarg:
        kwargs[size_kwarg] = size if size_kwarg == "image_size" else (size, size)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. GoogLeNet's init_weights notice
        return tv.models.get_model(name, **kwargs).eval()


def smallest_input(name: str) -> tuple[nn.Module, int]:
    """The model at the smallest size of :data:`SIZE_CANDIDATES` that it builds and runs on."""
    errors = []
    for size in SIZE_CANDIDATES:
        try:
            model = build(name, size)
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
            return model, size
        except Exception as exc:  # noqa: BLE001 - try the next size
            errors.append(f"{size}px: {(str(exc).strip().splitlines() or [''])[0][:120]}")
    raise StageError("build", "no input size fits: " + "; ".join(errors[-2:]))


def memory_needed(model: nn.Module, classes: int = len(ZOO_CLASSES)) -> int:
    """Estimated peak bytes of :func:`check_model` (accumulators, patterns, model copies)."""
    weights = sum(p.numel() for p in model.parameters())
    return weights * (BYTES_PER_WEIGHT_PER_CLASS * classes + BYTES_PER_WEIGHT)


def run_one(name: str, memory_budget: int) -> dict:
    """The zoo record of builder ``name`` (run in a worker process)."""
    start = time.perf_counter()
    record: dict = {"name": name, "family": family_of(name), "status": "failed"}
    try:
        model, size = _stage("build", lambda: smallest_input(name))
        record.update(input_size=[3, size, size], params=sum(p.numel() for p in model.parameters()))
        need = memory_needed(model)
        record["memory_estimate_gb"] = round(need / 2**30, 1)
        if need > memory_budget:
            record.update(status="skipped", stage="memory",
                          error=f"needs ~{need / 2**30:.0f} GB (> the {memory_budget / 2**30:.0f} GB budget): one class "
                                f"of float64 accumulators and {len(ZOO_CLASSES)} classes of patterns of "
                                f"{record['params'] / 1e6:.0f}M weights")
        else:
            result = check_model(model, (3, size, size))
            record.update(status="ok", gradient_error=result["gradient_error"])
    except StageError as exc:
        record.update(stage=exc.stage, error=exc.message)
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


# --------------------------------------------------------------------------------------------- the harness

def _rss(pid: int) -> int:
    """Resident bytes of process ``pid`` (0 where /proc is unavailable or it has exited)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def run_isolated(name: str, timeout: float, memory_budget: int, threads: int) -> dict:
    """:func:`run_one` in a subprocess, killed past ``timeout`` seconds or ``memory_budget`` resident bytes."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        out = Path(tmp) / "record.json"
        cmd = [sys.executable, "-m", "untangle_ext.zoo", "--worker", name, "--record", str(out),
               "--memory-gb", str(memory_budget / 2**30), "--threads", str(threads)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killed, peak = None, 0
        while proc.poll() is None:
            peak = max(peak, _rss(proc.pid))
            if peak > memory_budget * 1.25:
                killed = f"killed: resident memory {peak / 2**30:.1f} GB passed the {memory_budget / 2**30:.0f} GB guard"
            elif time.perf_counter() - start > timeout:
                killed = f"killed: no result within the {timeout:.0f} s timeout"
            if killed:
                proc.kill()
                break
            time.sleep(0.2)
        stderr = proc.communicate()[1] or ""
        if out.exists():
            record = json.loads(out.read_text())
        else:
            last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [f"exit code {proc.returncode}"]
            record = {"name": name, "family": family_of(name), "status": "failed", "stage": "process",
                      "error": killed or f"worker died: {last[0][:300]}",
                      "seconds": round(time.perf_counter() - start, 2)}
        record["peak_rss_gb"] = round(peak / 2**30, 2)
        return record


def _is_ok(record: dict) -> bool:
    return record.get("status") == "ok"


def markdown(records: Sequence[dict], meta: dict) -> str:
    """docs/zoo.md: overall percentage, per-family table, every failure with its error."""
    ok = sum(map(_is_ok, records))
    lines = [
        "# Model zoo: torchvision classification builders explained end to end", "",
        f"`{meta['command']}` — {meta['date']}, backend `{meta['backend']}`, torch {meta['torch']}, "
        f"torchvision {meta['torchvision']}, {meta['machine']} (timings measured on a shared, busy machine).", "",
        "Each builder: `weights=None`, `num_classes=10`, seeded random init, eval mode, the smallest input of "
        f"{list(SIZE_CANDIDATES)} px it accepts; 2 classes estimated on 32 generated images, 4 images attributed "
        "with `pattern_attribution`, `patternnet` and `gradient` (all finite), `gradient` equal to torch.autograd "
        f"in float64 (normwise relative error ≤ {GRADIENT_TOLERANCE:g}), model unchanged. Memory budget "
        f"{meta['memory_gb']:.0f} GB." + (f" Note: {meta['note']}." if meta.get("note") else ""), "",
        f"**{ok} / {len(records)} builders pass ({100.0 * ok / max(len(records), 1):.1f} %).**"
        + (f" Partial run: {len(records)} of the {meta['builders']} builders; `make zoo` runs them all."
           if len(records) < meta.get("builders", 0) else ""), "",
        "| family | builders | pass | % | input px | failing |", "|---|---:|---:|---:|---|---|",
    ]
    families: dict[str, list[dict]] = {}
    for r in records:
        families.setdefault(r["family"], []).append(r)
    for fam, rs in sorted(families.items()):
        good = sum(map(_is_ok, rs))
        sizes = sorted({r["input_size"][-1] for r in rs if r.get("input_size")})
        failing = ", ".join(r["name"] for r in rs if not _is_ok(r)) or "—"
        lines.append(f"| {fam} | {len(rs)} | {good} | {100.0 * good / len(rs):.0f} | "
                     f"{'/'.join(map(str, sizes)) or '?'} | {failing} |")
    lines += ["", "## Every builder", "", "| builder | family | status | input | params (M) | seconds |",
              "|---|---|---|---:|---:|---:|"]
    for r in records:
        status = "ok" if _is_ok(r) else f"{r['status']} ({r.get('stage', '?')})"
        size = r["input_size"][-1] if r.get("input_size") else "?"
        params = f"{r['params'] / 1e6:.1f}" if r.get("params") else "?"
        lines.append(f"| {r['name']} | {r['family']} | {status} | {size} | {params} | {r.get('seconds', '?')} |")
    failures = [r for r in records if not _is_ok(r)]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- **{r['name']}** ({r['status']} at `{r.get('stage', '?')}`): {r.get('error', '?')}" for r in failures]
    return "\n".join(lines) + "\n"


def _write_json(path: Path, payload: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(payload, indent=1) + "\n").encode()))


def run_zoo(names: Sequence[str], json_path: Path, md_path: Path, jobs: int, timeout: float,
            memory_budget: int, meta: dict) -> list[dict]:
    """Run every model in ``names`` isolated; merge into ``json_path`` and rewrite both files after each."""
    old = json.loads(json_path.read_text()).get("models", []) if json_path.exists() else []
    known = set(classification_models())
    records = {r["name"]: r for r in old if r["name"] in known}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(names), desc="model zoo", unit="model") as bar:
        futures = [pool.submit(run_isolated, n, timeout, memory_budget, threads) for n in names]
        for future in as_completed(futures):
            record = future.result()
            records[record["name"]] = record
            bar.set_postfix_str(f"{record['name']}: {record['status']}")
            bar.update()
            ordered = [records[n] for n in sorted(records)]
            _write_json(json_path, {"meta": meta, "models": ordered})
            atomic_write(md_path, lambda f: f.write(markdown(ordered, meta).encode()))
    return [records[n] for n in sorted(records)]


def _meta(argv: Sequence[str], memory_budget: int) -> dict:
    from . import backend
    tv = import_torchvision()
    try:
        from benchmarks.measure import cpu_model
        cpu = cpu_model()
    except ImportError:
        cpu = "unknown CPU"
    return {"command": "python -m untangle_ext.zoo " + " ".join(argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "backend": backend().name,
            "torch": torch.__version__, "torchvision": tv.__version__, "memory_gb": memory_budget / 2**30,
            "machine": f"{cpu}, {os.cpu_count()} cores", "builders": len(classification_models())}


def _default_memory_gb() -> float:
    """Three quarters of the available memory (MemAvailable), or 16 GB where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return 0.75 * int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return 16.0


def main(argv: Optional[Iterable[str]] = None) -> int:
    """CLI: ``python -m untangle_ext.zoo [--only NAME ...] [--jobs 1] [--timeout S] [--memory-gb G]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m untangle_ext.zoo", description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these builders (merged into the results)")
    p.add_argument("--jobs", type=int, default=1, help="models run at once (default 1)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per model (default 1800)")
    p.add_argument("--memory-gb", type=float, default=None, help="memory budget per model (default: 3/4 of available)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/zoo.json"))
    p.add_argument("--md", type=Path, default=Path("docs/zoo.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    budget = int((args.memory_gb or _default_memory_gb()) * 2**30)
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        warnings.simplefilter("ignore")
        record = run_one(args.worker, budget)
        _write_json(args.record, record)
        return 0
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    known = classification_models()
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        p.error(f"unknown builder(s) {unknown}; torchvision's classification builders are: {', '.join(known)}")
    records = run_zoo(args.only or known, args.json, args.md, args.jobs, args.timeout, budget, _meta(argv, budget))
    ok = sum(map(_is_ok, records))
    print(f"{ok}/{len(records)} builders pass ({100.0 * ok / max(len(records), 1):.1f} %); "
          f"table in {args.md}, records in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
