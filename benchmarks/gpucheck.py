"""`make gpu-check`: on a CUDA machine, in at most 8 minutes, the CUDA tests and the GPU benchmarks.

Fails loudly (exit 1, with the reason) when there is no GPU, when torch has no CUDA, or when the
native extension did not load with its CUDA ops (no silent PyTorch fallback on a GPU machine).
Then: the CUDA-parametrised tests (``pytest -k cuda``), and per model (LeNet b256, VGG-style b64,
VGG-16 and ResNet-50 at 224, b32) and backend (native, torch) in a fresh process: forward,
estimation (``Moments.update``) and attribution B = 8 × k = 3, each the median of repeats after
``torch.cuda.synchronize``. Writes ``benchmarks/results/<gpu>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .measure import machine_info, time_repeats
from .suite import git_revision, write_atomic

ROOT = Path(__file__).resolve().parents[1]
#: (model, per-image shape, batch): what the GPU benchmarks run.
WORKLOADS = {"lenet": ((1, 28, 28), 256), "vgg_style": ((3, 64, 64), 64),
             "vgg16": ((3, 224, 224), 32), "resnet50": ((3, 224, 224), 32)}
BACKENDS = ("native", "torch")
TEST_TIMEOUT_S, WORKER_TIMEOUT_S = 240, 50  # 240 + 8 × 50 s < 8 min


def _model(name: str) -> torch.nn.Module:
    from . import realmodels, workloads
    if name == "lenet":
        return workloads.lenet()
    if name == "vgg_style":
        return workloads.vgg()
    torch.manual_seed(0)
    return realmodels.MODELS[name]().eval()


def measure(name: str) -> dict:
    """Forward, estimation and attribution rates of one workload on the current GPU (this process's backend)."""
    from untangle_ext import ALL_CLASSES, Attributor, SignalEstimator, backend
    from untangle_ext.moments import Moments

    shape, batch = WORKLOADS[name]
    model = _model(name).cuda()
    x = torch.randn(batch, *shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    labels = torch.zeros(batch, dtype=torch.long, device="cuda")

    def synced(fn):
        return lambda: (fn(), torch.cuda.synchronize())

    estimator = SignalEstimator(model, per_class=False, progress=False)
    moments = Moments(estimator.program, 1)
    with torch.no_grad():
        forward = time_repeats(synced(lambda: model(x)), batch, repeats=5, warmup=2)
    estimation = time_repeats(synced(lambda: moments.update(x, labels)), batch, repeats=5, warmup=2)
    store = estimator.fit([(x, labels)])[ALL_CLASSES]
    attributor = Attributor(model, store)
    xb = x[:8]
    attribution = time_repeats(synced(lambda: attributor.explain(xb, topk=3)), 8 * 3, repeats=5, warmup=2)
    return {"backend": dataclasses.asdict(backend()), "batch": batch, "forward": forward,
            "estimation": estimation, "attribution_k3": attribution,
            "max_memory_allocated": torch.cuda.max_memory_allocated()}


def _worker(name: str, backend: str) -> dict:
    """One workload under one backend in a fresh process (its own CUDA context and peak memory)."""
    cmd = [sys.executable, "-m", "benchmarks.gpucheck", "--worker", name]
    env = {**os.environ, "UNTANGLE_EXT_BACKEND": backend}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cuda_tests() -> dict:
    """The tests parametrised or marked for CUDA (``-k cuda``), with a time limit."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests"], capture_output=True,
                              text=True, cwd=ROOT, timeout=TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"passed": False, "summary": f"timed out after {TEST_TIMEOUT_S} s"}
    lines = proc.stdout.strip().splitlines()
    return {"passed": proc.returncode == 0, "summary": lines[-1] if lines else proc.stderr[-500:],
            "seconds": time.perf_counter() - start}


def preflight() -> Optional[str]:
    """Why this machine cannot run the GPU check (None when it can)."""
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} has no CUDA; install a CUDA torch into the venv "
                "(e.g. `make TORCH_SPEC=2.14.1 gpu-check`)")
    if not torch.cuda.is_available():
        return "torch has CUDA but sees no GPU (check the driver and CUDA_VISIBLE_DEVICES)"
    from untangle_ext import backend
    info = backend()
    if info.name != "native":
        return f"the native extension is not active on this GPU machine: {info.reason}"
    from untangle_ext import ops
    try:
        ops._check_cuda(torch.device("cuda", torch.cuda.current_device()))
    except RuntimeError as exc:  # the build does not fit this GPU: say why before running anything
        return str(exc)
    return None


def markdown(doc: dict) -> str:
    """Table of rates per workload and backend, the native/torch ratios and the targets."""
    rows = [f"GPU check on {doc['gpu']} (commit {doc['commit']}, torch {doc['machine']['torch']}, "
            f"CUDA {doc['cuda']}): CUDA tests {'passed' if doc['tests']['passed'] else 'FAILED'} "
            f"({doc['tests']['summary']}).", "",
            "| workload | backend | forward img/s | estimation img/s | attribution (img·class)/s k=3 |",
            "|---|---|---|---|---|"]
    for name, per in doc["results"].items():
        for b, r in per.items():
            if "error" in r:
                rows.append(f"| {name} | {b} | error: {r['error'].splitlines()[-1][:120]} | | |")
            else:
                rows.append(f"| {name} | {b} | {r['forward']['rate']:.1f} | {r['estimation']['rate']:.1f} | "
                            f"{r['attribution_k3']['rate']:.1f} |")
    rows += ["", "| ratio | value | target |", "|---|---|---|"]
    for name, ratio in doc["native_over_torch"].items():
        target = "≥ 2×" if name == "vgg16.estimation" else ""
        rows.append(f"| native / torch, {name} | {'n/a' if ratio is None else f'{ratio:.2f}×'} | {target} |")
    return "\n".join(rows) + "\n"


def _ratios(results: dict) -> dict:
    """native / torch rate per workload and measurement (None where either failed)."""
    out = {}
    for name, per in results.items():
        for what in ("estimation", "attribution_k3"):
            n, t = per.get("native", {}), per.get("torch", {})
            ok = what in n and what in t
            out[f"{name}.{what}"] = n[what]["rate"] / t[what]["rate"] if ok else None
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpucheck", description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        print(json.dumps(measure(args.worker)))
        return 0
    why = preflight()
    if why is not None:
        print(f"make gpu-check: cannot run: {why}", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name()
    doc = {"schema": "untangle_ext-gpucheck/1", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "commit": git_revision(), "gpu": gpu, "cuda": torch.version.cuda, "machine": machine_info(),
           "tests": _cuda_tests(), "results": {}}
    for name in WORKLOADS:
        doc["results"][name] = {b: _worker(name, b) for b in BACKENDS}
    doc["native_over_torch"] = _ratios(doc["results"])
    tag = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = Path(args.out_dir)
    write_atomic(out / f"{tag}.json", json.dumps(doc, indent=1))
    write_atomic(out / f"{tag}.md", markdown(doc))
    print(markdown(doc))
    failed = not doc["tests"]["passed"] or any("error" in r for per in doc["results"].values() for r in per.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
