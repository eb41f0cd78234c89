"""Turn the workers' raw measurements into ratios, target verdicts and a markdown table.

GEMM fraction = (forward + statistics FLOPs per image) × images/s ÷ the torch.mm 2048² fp32 rate
of the same process, where statistics FLOPs = 3 × the forward GEMM FLOPs of every Linear/Conv2d
(three D×K products per sample position: Σ x yᵀ, Σ⁺ x, Σ⁺ x yᵀ).
"""
from __future__ import annotations

import math
from typing import Optional

BACKENDS = ("torch", "native")
STATS_FACTOR = 3  # statistics FLOPs per forward GEMM FLOP (see module docstring)

#: (name, (Results method, *args after the backend), threshold), evaluated per backend.
TARGETS = (
    ("LeNet est. b16 / forward >= 0.5", ("est_over", "lenet_b16", "forward"), 0.5),
    ("LeNet est. b16 / naive loop >= 20x", ("est_over", "lenet_b16", "naive"), 20.0),
    ("VGG GEMM fraction >= 75%", ("gemm_fraction", "vgg_b64"), 0.75),
    ("attr vs Saliency LeNet >= 2.5x", ("attr_over", "lenet", "captum"), 2.5),
    ("attr vs Saliency VGG >= 2x", ("attr_over", "vgg", "captum"), 2.0),
)
#: (name, (task kind, workload key), threshold) for the native backend against the torch one.
NATIVE_TARGETS = (
    ("native/torch LeNet est. b16 >= 1.3x", ("est", "lenet_b16"), 1.3),
    ("native/torch VGG est. b64 >= 1.3x", ("est", "vgg_b64"), 1.3),
    ("native/torch LeNet attr >= 1.3x", ("attr", "lenet"), 1.3),
    ("native/torch VGG attr >= 1.3x", ("attr", "vgg"), 1.3),
)


def _rate(rec: Optional[dict]) -> Optional[float]:
    if not rec or "rate" not in rec:
        return None
    return rec["rate"]


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if (a is not None and b) else None


class Results:
    """Index over the raw records: ``m[worker][task]`` (workers: baselines, torch, native)."""

    def __init__(self, measurements: dict, backends: dict):
        self.m = measurements
        self.backends = backends

    def rec(self, worker: str, task: str) -> Optional[dict]:
        return self.m.get(worker, {}).get(task)

    def available(self) -> list[str]:
        return [b for b in BACKENDS if self.backends.get(b, {}).get("available")]

    def baseline(self, kind: str, key: str) -> Optional[float]:
        """Rate of a baseline: forward (from torch's worker), naive, seed_style, captum."""
        model = key.split("_")[0]
        task = {"naive": f"naive:{key}", "seed_style": f"seed_est:{model}", "captum": f"captum:{key}",
                "seed_attr": f"seed_attr:{key}"}.get(kind)
        return _rate(self.rec("baselines", task)) if task else None

    def est_over(self, backend: str, key: str, kind: str) -> Optional[float]:
        ours = _rate(self.rec(backend, f"est:{key}"))
        other = _rate(self.rec(backend, f"forward:{key}")) if kind == "forward" else self.baseline(kind, key)
        return _div(ours, other)

    def attr_over(self, backend: str, key: str, kind: str) -> Optional[float]:
        return _div(_rate(self.rec(backend, f"attr:{key}")), self.baseline(kind, key))

    def gemm_fraction(self, backend: str, key: str) -> Optional[float]:
        rec, gemm = self.rec(backend, f"est:{key}"), self.rec(backend, "gemm")
        if _rate(rec) is None or _rate(gemm) is None:
            return None
        flops = (1 + STATS_FACTOR) * rec["forward_flops_per_image"]
        return flops * rec["rate"] / gemm["rate"]

    def native_over_torch(self, kind: str, key: str) -> Optional[float]:
        task = f"{kind}:{key}"
        return _div(_rate(self.rec("native", task)), _rate(self.rec("torch", task)))


def ratios(r: Results, est_keys: list[str], att_keys: list[str]) -> list[dict]:
    """Every derived ratio, one dict per (name, backend); value None where a side is missing."""
    out = []
    for b in BACKENDS:
        for key in est_keys:
            for kind in ("forward", "naive", "seed_style"):
                out.append({"name": f"est {key} / {kind}", "backend": b, "value": r.est_over(b, key, kind)})
            out.append({"name": f"est {key} GEMM fraction", "backend": b, "value": r.gemm_fraction(b, key)})
        for key in att_keys:
            for kind in ("captum", "seed_attr"):
                out.append({"name": f"attr {key} / {kind}", "backend": b, "value": r.attr_over(b, key, kind)})
    for kind, keys in (("est", est_keys), ("attr", att_keys)):
        for key in keys:
            out.append({"name": f"{kind} {key} native / torch", "backend": "native",
                        "value": r.native_over_torch(kind, key)})
    return out


def _verdict(value: Optional[float], threshold: float, why_missing: str) -> tuple[Optional[float], str]:
    if value is None or not math.isfinite(value):
        return None, f"n/a ({why_missing})"
    return value, "met" if value >= threshold else "not met"


def targets(r: Results) -> list[dict]:
    """Issue 3's targets, each with its value and met / not met / n/a (reason)."""
    rows = []
    for b in BACKENDS:
        reason = r.backends.get(b, {}).get("reason", "not run")
        for name, (fn, *args), threshold in TARGETS:
            value = getattr(r, fn)(b, *args)
            missing = reason if b not in r.available() else "a measurement is missing (see the JSON)"
            captum = r.rec("baselines", f"captum:{args[0]}") if fn == "attr_over" else None
            if captum and "skipped" in captum:
                missing = captum["skipped"]
            value, verdict = _verdict(value, threshold, missing)
            rows.append({"target": name, "backend": b, "threshold": threshold, "value": value, "verdict": verdict})
    native_reason = r.backends.get("native", {}).get("reason", "not run")
    for name, (kind, key), threshold in NATIVE_TARGETS:
        value, verdict = _verdict(r.native_over_torch(kind, key), threshold,
                                  native_reason if "native" not in r.available() else "a measurement is missing")
        rows.append({"target": name, "backend": "native", "threshold": threshold, "value": value,
                     "verdict": verdict})
    return rows


def memory(r: Results) -> dict:
    """Peak RSS of VGG estimation per backend, against accumulators + one batch of activations."""
    out = {}
    for b in r.available():
        rec = r.rec(b, "est:vgg_b64") or {}
        mem = rec.get("memory")
        if not mem:
            continue
        delta = mem["peak_rss"] - mem["rss_before"]
        budget = mem["accumulator_bytes"] + mem["activation_bytes_per_batch"]
        out[b] = {**mem, "peak_over_start": delta, "over_accumulators": delta - mem["accumulator_bytes"],
                  "bound": budget, "within_bound": delta <= budget}
    return out


# ---------------------------------------------------------------- markdown

def _fmt_rate(rec: Optional[dict]) -> str:
    if not rec:
        return "—"
    if "skipped" in rec:
        return "skipped"
    if "error" in rec:
        return "error"
    return f"{rec['rate']:,.1f} ({rec['rate_min']:,.0f}–{rec['rate_max']:,.0f})"


def _fmt_x(v: Optional[float], pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.2f}×"


def _gb(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def markdown(doc: dict) -> str:
    """The results as markdown: header, targets, estimation, attribution, memory, agreement."""
    r = Results(doc["measurements"], doc["backends"])
    cfg, mach = doc["config"], doc["machine"]
    lines = [f"# untangle_ext benchmarks — {doc['tag']}", ""]
    if doc["quick"]:
        lines += ["**Quick run: reduced sizes (see config); the numbers are NOT comparable to the targets.**", ""]
    lines += [
        f"- date (UTC): {doc['created_utc']}; wall time {doc['wall_s']:.0f} s; command: `{doc['command']}`; "
        f"commit {doc.get('git', 'unknown')}",
        f"- machine: {mach.get('cpu')} · {mach.get('cores')} cores · torch {mach.get('torch')} · "
        f"{mach.get('threads')} threads · load average at start {mach.get('loadavg_1_5_15')}",
    ]
    for b in BACKENDS:
        info = doc["backends"].get(b, {})
        state = "available" if info.get("available") else "n/a"
        lines.append(f"- backend `{b}`: {state} ({info.get('reason', 'not run')})")
    lines += ["- rates: median of repeats (min–max in brackets); estimation in images/s, attribution in "
              "(image·class)/s", "", "## Targets (issue 3)", "", "| target | backend | value | verdict |",
              "|---|---|---|---|"]
    for t in doc["targets"]:
        pct = "%" in t["target"]
        verdict = t["verdict"]
        if not doc["backends"].get(t["backend"], {}).get("available"):
            verdict = f"n/a (backend `{t['backend']}` unavailable, reason above)"
        lines.append(f"| {t['target']} | {t['backend']} | {_fmt_x(t['value'], pct)} | {verdict} |")
    lines += ["", "## Estimation throughput (images/s)", "",
              "| workload | batch | torch | native | forward only | naive loop | seed-style | "
              "GEMM fraction (torch / native) |", "|---|---|---|---|---|---|---|---|"]
    for est in cfg["estimation"]:
        key = est["key"]
        fr = " / ".join(_fmt_x(r.gemm_fraction(b, key), pct=True) for b in BACKENDS)
        lines.append(
            f"| {key} | {est['batch']} | {_fmt_rate(r.rec('torch', f'est:{key}'))} | "
            f"{_fmt_rate(r.rec('native', f'est:{key}'))} | {_fmt_rate(r.rec('torch', f'forward:{key}'))} | "
            f"{_fmt_rate(r.rec('baselines', f'naive:{key}'))} | "
            f"{_fmt_rate(r.rec('baselines', 'seed_est:' + est['model']))} | {fr} |")
    lines += ["", "## Attribution throughput ((image·class)/s)", "",
              "| model | B × k | torch | native | Captum Saliency | seed-style |", "|---|---|---|---|---|---|"]
    for att in cfg["attribution"]:
        key = att["key"]
        lines.append(
            f"| {key} | {att['batch']} × {att['topk']} | {_fmt_rate(r.rec('torch', f'attr:{key}'))} | "
            f"{_fmt_rate(r.rec('native', f'attr:{key}'))} | {_fmt_rate(r.rec('baselines', f'captum:{key}'))} | "
            f"{_fmt_rate(r.rec('baselines', f'seed_attr:{key}'))} |")
    lines += ["", "## Ratios", "", "| ratio | torch | native |", "|---|---|---|"]
    by_name: dict[str, dict] = {}
    for row in doc["ratios"]:
        by_name.setdefault(row["name"], {})[row["backend"]] = row["value"]
    for name, vals in by_name.items():
        pct = "fraction" in name
        lines.append(f"| {name} | {_fmt_x(vals.get('torch'), pct) if 'torch' in vals else ''} | "
                     f"{_fmt_x(vals.get('native'), pct)} |")
    lines += ["", "## Peak RSS of VGG-style estimation (fresh worker process, all 10 classes)", "",
              "| backend | RSS before | peak RSS | peak − before | accumulators | one batch of activations | "
              "within accumulators + activations |", "|---|---|---|---|---|---|---|"]
    for b, mem in doc["memory"].items():
        lines.append(f"| {b} | {_gb(mem['rss_before'])} | {_gb(mem['peak_rss'])} | {_gb(mem['peak_over_start'])} | "
                     f"{_gb(mem['accumulator_bytes'])} | {_gb(mem['activation_bytes_per_batch'])} | "
                     f"{'yes' if mem['within_bound'] else 'no'} |")
    agree = r.rec("baselines", "agreement") or {}
    lines += ["", "## Baselines agree with the library (max relative difference, LeNet)", ""]
    lines += [f"- {k}: {v:.2e}" if isinstance(v, float) else f"- {k}: {v}" for k, v in agree.items()
              if k != "task_wall_s"]
    prep = r.rec("baselines", "prepare") or {}
    lines += ["", "## One-off pattern computation (SignalEstimator.fit incl. patterns + stores, default backend)",
              ""]
    lines += [f"- {k}: {v['fit_s']:.1f} s for {v['images']} images" for k, v in prep.items() if isinstance(v, dict)]
    errors = [f"{w}/{t}: {rec['error']}" for w, tasks in doc["measurements"].items()
              for t, rec in tasks.items() if isinstance(rec, dict) and "error" in rec]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"
