"""The suite's entry point: run every worker of one benchmark run and write JSON + markdown.

Workers run one after another as subprocesses (so each backend gets a fresh process and its
own peak RSS): ``baselines`` with the default backend, then one per backend with
``UNTANGLE_EXT_BACKEND`` forced. A backend that cannot be loaded is reported as n/a with the
reason the library gives. One tqdm bar counts the tasks of the whole run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from tqdm.auto import tqdm

from . import report
from .worker import PREFIX

ROOT = Path(__file__).resolve().parents[1]
ENV = "UNTANGLE_EXT_BACKEND"


def sizes(mode: str) -> dict:
    """Workload sizes: 'full' (the reported run, < 10 min on 2 idle cores), 'quick' (< 1 min, a
    smaller VGG) or 'tiny' (the test suite's smoke run)."""
    full = {
        "lenet_images": 1024, "repeats": 3, "vgg_width_div": 1, "vgg_size": 64, "vgg_batch": 64,
        "vgg_images": 64, "vgg_repeats": 2, "naive_images": {"lenet": 256, "vgg": 2}, "naive_repeats": 2,
        "seed_est_images": {"lenet": 100, "vgg": 10}, "seed_repeats": 2, "attr_batch": 64,
        "seed_attr_images": {"lenet": 8, "vgg": 2}, "prepare_images": {"lenet": 1024, "vgg": 64},
        "agreement_images": 48, "gemm_n": 2048,
    }
    quick = {**full, "lenet_images": 256, "repeats": 2, "vgg_width_div": 4, "vgg_size": 32, "vgg_batch": 16,
             "vgg_images": 16, "vgg_repeats": 2, "naive_images": {"lenet": 64, "vgg": 2}, "naive_repeats": 1,
             "seed_est_images": {"lenet": 20, "vgg": 10}, "seed_repeats": 1, "attr_batch": 16,
             "seed_attr_images": {"lenet": 2, "vgg": 1}, "prepare_images": {"lenet": 512, "vgg": 32},
             "agreement_images": 24, "gemm_n": 1024}
    tiny = {**quick, "lenet_images": 32, "vgg_width_div": 16, "vgg_size": 16, "vgg_batch": 8, "vgg_images": 8,
            "naive_images": {"lenet": 16, "vgg": 2}, "seed_est_images": {"lenet": 10, "vgg": 10}, "attr_batch": 8,
            "prepare_images": {"lenet": 48, "vgg": 20}, "agreement_images": 16, "gemm_n": 256}
    return {"full": full, "quick": quick, "tiny": tiny}[mode]


def build_config(args: argparse.Namespace, stores_dir: str) -> dict:
    """The JSON config every worker receives."""
    s = sizes("tiny" if args.tiny else "quick" if args.quick else "full")
    rep = args.repeats
    lenet_rep, vgg_rep = rep or s["repeats"], rep or s["vgg_repeats"]
    estimation = [
        {"key": "lenet_b16", "model": "lenet", "batch": 16, "images": s["lenet_images"], "repeats": lenet_rep,
         "naive_images": s["naive_images"]["lenet"], "naive_repeats": s["naive_repeats"]},
        {"key": "lenet_b256", "model": "lenet", "batch": 256, "images": s["lenet_images"], "repeats": lenet_rep,
         "naive_images": s["naive_images"]["lenet"], "naive_repeats": s["naive_repeats"]},
        {"key": "vgg_b64", "model": "vgg", "batch": s["vgg_batch"], "images": s["vgg_images"], "repeats": vgg_rep,
         "naive_images": s["naive_images"]["vgg"], "naive_repeats": 1},
    ]
    attribution = [
        {"key": name, "model": name, "batch": s["attr_batch"], "topk": 3, "repeats": r,
         "seed_images": s["seed_attr_images"][name]} for name, r in (("lenet", lenet_rep), ("vgg", vgg_rep))
    ]
    return {
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full", "threads": args.threads,
        "stores_dir": stores_dir, "estimation": estimation, "attribution": attribution,
        **{k: s[k] for k in ("vgg_width_div", "vgg_size", "seed_est_images", "seed_repeats", "prepare_images",
                             "agreement_images", "gemm_n")},
    }


def task_counts(cfg: dict) -> dict[str, int]:
    """How many ``@@BENCH`` records each kind of worker emits (for the progress bar)."""
    n_est, n_att = len(cfg["estimation"]), len(cfg["attribution"])
    return {"baselines": 3 + n_est + 2 + 2 * n_att, "backend": 1 + 2 * n_est + 1 + n_att}


def run_worker(role: str, cfg: dict, env: dict, bar: tqdm, expected: int) -> dict:
    """Run one worker to completion, feeding the bar; return its records by task name."""
    cmd = [sys.executable, "-m", "benchmarks.worker", role, json.dumps(cfg)]
    records: dict[str, dict] = {}
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if not line.startswith(PREFIX):
                tqdm.write(line.rstrip())
                continue
            rec = json.loads(line[len(PREFIX):])
            records[rec.pop("task")] = rec
            bar.set_postfix_str(f"{role}: {list(records)[-1]}")
            bar.update(1)
    if proc.returncode:
        records["worker_error"] = {"error": f"{role} worker exited with status {proc.returncode}"}
    bar.update(max(0, expected - len(records)))  # an unavailable backend skips its tasks
    return records


def worker_env(backend: Optional[str]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop(ENV, None)
    if backend:
        env[ENV] = backend
    return env


def git_revision() -> str:
    """The checkout's commit (with ``-dirty`` for uncommitted changes), or 'unknown' outside git."""
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev.stdout.strip() or "unknown"


def machine_tag(machine: dict, mode: str) -> str:
    """A file-name tag such as ``cpu-amd-epyc-2t`` (``-quick`` / ``-tiny`` for reduced runs)."""
    cpu = re.sub(r"[^a-z0-9]+", "-", str(machine.get("cpu", "unknown")).lower()).strip("-")[:40]
    tag = f"{'cuda' if machine.get('cuda') else 'cpu'}-{cpu}-{machine.get('threads')}t"
    return tag + ("" if mode == "full" else f"-{mode}")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file + rename (never a half-written result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_suite(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """Run all workers and assemble the results document."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="untangle-bench-") as stores_dir:
        cfg = build_config(args, stores_dir)
        counts = task_counts(cfg)
        roles = [("baselines", None)] + [(f"backend:{b}", b) for b in args.backends]
        total = counts["baselines"] + counts["backend"] * len(args.backends)
        measurements: dict[str, dict] = {}
        with tqdm(total=total, desc="benchmarks", unit="task") as bar:
            for role, backend in roles:
                name = backend or "baselines"
                expected = counts["backend"] if backend else counts["baselines"]
                measurements[name] = run_worker(role, cfg, worker_env(backend), bar, expected)
    backends = {}
    for b in args.backends:
        rec = measurements[b].get("backend", {"available": False, "reason": "the worker reported nothing"})
        backends[b] = {"available": rec.get("available", False), "reason": rec.get("reason", "")}
    machine = dict(measurements["baselines"].get("machine", {}))
    results = report.Results(measurements, backends)
    est_keys = [e["key"] for e in cfg["estimation"]]
    att_keys = [a["key"] for a in cfg["attribution"]]
    doc = {
        "schema": "untangle_ext-bench/1", "tag": args.tag or machine_tag(machine, cfg["mode"]),
        "created_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["python -m benchmarks", *argv]), "git": git_revision(), "quick": cfg["mode"] != "full",
        "config": {k: v for k, v in cfg.items() if k != "stores_dir"}, "machine": machine,
        "backends": backends, "measurements": measurements,
        "ratios": report.ratios(results, est_keys, att_keys), "targets": report.targets(results),
        "memory": report.memory(results), "wall_s": time.perf_counter() - start,
    }
    return doc


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="untangle-ext bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced sizes (< 1 min); not comparable to targets")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's smoke run
    parser.add_argument("--backends", default="torch,native",
                        help="comma-separated backends to measure (default: torch,native)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (override)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"), help="where to write results")
    parser.add_argument("--tag", default=None, help="results file name (default: derived from the machine)")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in args.backends if b not in report.BACKENDS]
    if bad or not args.backends:
        parser.error(f"--backends must list some of {report.BACKENDS}, got {bad or 'nothing'}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the suite; write ``<out-dir>/<tag>.json`` and ``.md``; print the markdown."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    doc = run_suite(args, argv)
    out = Path(args.out_dir)
    text = report.markdown(doc)
    write_atomic(out / f"{doc['tag']}.json", json.dumps(doc, indent=1) + "\n")
    write_atomic(out / f"{doc['tag']}.md", text)
    print(text)
    print(f"wrote {out / doc['tag']}.json and .md")
    return 0
