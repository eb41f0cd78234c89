"""Real-model benchmarks (issue 15): ResNet-50 and VGG-16 at 3×224×224 with random weights.

Per model, in one worker process (so peak RSS is the model's own): forward, one-class estimation
to a saved store (``fit_to_files``, 32 images) split into statistics / patterns / the rest,
patterns against the machine's memory bandwidth (a torch copy of the same bytes, same run),
attribution B × k = 3 and 10 against Captum ``Saliency``, peak RSS against accumulators + one
batch of activations. Each run appends its key ratios to ``benchmarks/results/history.jsonl``
and redraws ``trend.png``. The architectures are torchvision's (same layers and shapes), built
here so the benchmark needs no torchvision. ``--quick``: width/16 at 32×32, 2 images (< 1 min idle).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from untangle_ext import backend
from untangle_ext.store import DEFAULT_KEEP
from untangle_ext._io import atomic_write

from .measure import current_rss, forward_profile, gemm_rate, machine_info, peak_rss, time_repeats
from .suite import git_revision, write_atomic

RESULTS = Path(__file__).resolve().parent / "results"
HISTORY = "history.jsonl"
#: Bytes per weight a pattern computation must move: 3 float64 sums read, the fp32 weight read, 3 fp32 patterns written.
def pattern_bytes_per_weight(kept: int = 3) -> int:
    """Bytes the pattern pass moves per weight: three float64 sums and the fp32 weight read, ``kept`` fp32
    patterns written (3 for ``compute_patterns``; ``fit_to_files`` writes only its ``keep``, default a_pos)."""
    return 3 * 8 + 4 + 4 * kept


# --- torchvision's VGG-16 and ResNet-50 layer for layer (random weights) ---
def vgg16(width_div: int = 1, num_classes: int = 1000) -> nn.Module:
    """torchvision ``vgg16`` (configuration D, no batch norm); widths divided by ``width_div``."""
    layers: list[nn.Module] = []
    c = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, int(v) // width_div, 3, padding=1), nn.ReLU(inplace=True)]
            c = int(v) // width_div
    hidden = 4096 // width_div
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(7), nn.Flatten(),
                         nn.Linear(c * 49, hidden), nn.ReLU(True), nn.Dropout(),  # fc6 = index 3
                         nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(), nn.Linear(hidden, num_classes))


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (stride on the 3×3 conv)."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet50(width_div: int = 1, num_classes: int = 1000) -> nn.Module:
    """torchvision ``resnet50`` (blocks 3-4-6-3); widths divided by ``width_div``."""
    w0 = 64 // width_div
    layers: list[nn.Module] = [nn.Conv2d(3, w0, 7, 2, 3, bias=False), nn.BatchNorm2d(w0), nn.ReLU(True),
                               nn.MaxPool2d(3, 2, 1)]
    cin = w0
    for i, blocks in enumerate((3, 4, 6, 3)):
        width = w0 * 2 ** i
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, 2 if (b == 0 and i > 0) else 1))
            cin = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[..., nn.Module]] = {"resnet50": resnet50, "vgg16": vgg16}


def sizes(quick: bool) -> dict:
    """Workload sizes: full (224×224, 32 images, B = 8) or quick (width/16, 32×32, 2 images, B = 2)."""
    if quick:
        return {"width_div": 16, "size": 32, "images": 2, "batch": 2, "attr_batch": 2, "topk": [3, 10],
                "repeats": 1, "attr_repeats": 1, "gemm_n": 512}
    return {"width_div": 1, "size": 224, "images": 32, "batch": 8, "attr_batch": 8, "topk": [3, 10],
            "repeats": 3, "attr_repeats": 1, "gemm_n": 2048}


class PhaseTimer:
    """Wraps functions the estimator calls to time them in place (seconds and calls per phase, per layer)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.layers: dict[str, float] = {}
        self.weights: dict[str, int] = {}

    def wrap(self, owner: object, attr: str, phase: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            dt = time.perf_counter() - start
            self.seconds[phase] = self.seconds.get(phase, 0.0) + dt
            if phase == "patterns":  # args[0] is the LayerMoments
                name = args[0].layer.name
                self.layers[name] = self.layers.get(name, 0.0) + dt
                self.weights[name] = args[0].layer.weight.numel()
            return out

        setattr(owner, attr, timed)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s moved (read + write) by a torch copy of ``nbytes`` (at most 1 GiB), median of repeats."""
    n = max(1, min(nbytes, 1 << 30) // 8)
    src, dst = torch.ones(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    rec = time_repeats(lambda: dst.copy_(src), 2.0 * 8 * n, repeats)
    return rec["rate"]


def _estimate(model: nn.Module, x: torch.Tensor, cfg: dict, out_dir: Path) -> tuple[dict, object]:
    """One-class ``fit_to_files`` timed by phase; returns the record and the saved store."""
    import untangle_ext.estimator as est_mod
    from untangle_ext.moments import Moments, accumulator_bytes
    from untangle_ext.store import SignalStore

    timer = PhaseTimer()
    timer.wrap(Moments, "update", "statistics")
    timer.wrap(est_mod, "compute_patterns", "patterns")
    timer.wrap(est_mod, "model_fingerprint", "fingerprint")
    timer.wrap(SignalStore, "save", "save")
    batches = [(x[i:i + cfg["batch"]], torch.zeros(len(x[i:i + cfg["batch"]]), dtype=torch.long))
               for i in range(0, len(x), cfg["batch"])]
    estimator = est_mod.SignalEstimator(model, classes=[0], progress=False)
    rss0 = current_rss()
    start = time.perf_counter()
    paths = estimator.fit_to_files(out_dir / "store", lambda c: batches)
    total = time.perf_counter() - start
    acc = accumulator_bytes(estimator.program, 1)
    return {
        "to_saved_store_s": total, "phases_s": timer.seconds, "patterns_by_layer_s": timer.layers,
        "weights_by_layer": timer.weights, "images": len(x), "batch": cfg["batch"],
        "peak_rss_over_start": peak_rss() - rss0, "accumulator_bytes": acc,
    }, SignalStore.load(paths[0])


def _attribution(model: nn.Module, store, cfg: dict) -> dict:
    """Attributor.explain B × k against Captum Saliency (k calls of B images), k from cfg['topk']."""
    from untangle_ext import ALL_CLASSES, Attributor

    from .baselines import captum_saliency
    from .worker import captum_missing

    all_classes = dataclasses.replace(store, class_id=ALL_CLASSES,
                                      estimator={**store.estimator, "per_class": False})
    attributor = Attributor(model, all_classes)
    x = torch.randn(cfg["attr_batch"], 3, cfg["size"], cfg["size"], generator=torch.Generator().manual_seed(1))
    out = {}
    missing = captum_missing()
    for i, k in enumerate(cfg["topk"]):  # the first k's warm-up also warms the others up
        pairs, warmup = x.shape[0] * k, int(i == 0)
        ours = time_repeats(lambda: attributor.explain(x, topk=k), pairs, cfg["attr_repeats"], warmup)
        rec = {"ours": ours, "bound": 2 * k / (k + 1)}
        if missing is None:
            rec["saliency"] = time_repeats(lambda: captum_saliency(model, x, k), pairs, cfg["attr_repeats"], warmup)
            rec["over_saliency"] = ours["rate"] / rec["saliency"]["rate"]
            rec["of_bound"] = rec["over_saliency"] / rec["bound"]
        else:
            rec["saliency"] = {"skipped": missing}
        out[f"k{k}"] = rec
    return out


def run_model(name: str, cfg: dict) -> dict:
    """Every measurement of one model (call in a fresh process for a meaningful peak RSS)."""
    torch.manual_seed(0)
    model = MODELS[name](cfg["width_div"]).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["images"], 3, cfg["size"], cfg["size"], generator=gen)
    prof = forward_profile(model, x[:1])
    batch = x[:cfg["batch"]]
    with torch.no_grad():
        forward = time_repeats(lambda: model(batch), batch.shape[0], cfg["repeats"])
    with tempfile.TemporaryDirectory() as tmp:
        est, store = _estimate(model, x, cfg, Path(tmp))
    gemm = gemm_rate(cfg["gemm_n"], repeats=max(3, cfg["repeats"]))["rate"]
    weights = sum(est["weights_by_layer"].values())
    per_weight = pattern_bytes_per_weight(len(DEFAULT_KEEP))
    pattern_bytes = per_weight * weights
    bandwidth = copy_bandwidth(pattern_bytes, max(3, cfg["repeats"]))
    stats_s = est["phases_s"]["statistics"]
    rec = {
        "model": name, "config": cfg, "forward": forward, **prof, "estimation": est,
        "estimation_images_per_s": cfg["images"] / stats_s,
        "gemm_rate": gemm, "gemm_fraction": 4 * prof["forward_flops_per_image"] * cfg["images"] / stats_s / gemm,
        "copy_bandwidth": bandwidth, "pattern_bytes": pattern_bytes,
        "patterns_bandwidth_fraction": pattern_bytes / est["phases_s"]["patterns"] / bandwidth,
        "activation_bytes_per_batch": prof["activation_bytes_per_image"] * cfg["batch"],
    }
    largest = max(est["weights_by_layer"], key=est["weights_by_layer"].get)  # VGG-16: fc6
    rec["largest_layer"] = {"name": largest, "weights": est["weights_by_layer"][largest],
                            "bandwidth_fraction": per_weight * est["weights_by_layer"][largest]
                            / est["patterns_by_layer_s"][largest] / bandwidth}
    budget = est["accumulator_bytes"] + rec["activation_bytes_per_batch"]
    rec["rss_over_budget"] = est["peak_rss_over_start"] / budget
    rec["attribution"] = _attribution(model, store, cfg)
    return rec


def key_ratios(models: dict) -> dict:
    """The numbers the history tracks, one flat dict (model.metric -> ratio)."""
    out = {}
    for name, r in models.items():
        out[f"{name}.gemm_fraction"] = r["gemm_fraction"]
        out[f"{name}.patterns_bandwidth"] = r["patterns_bandwidth_fraction"]
        out[f"{name}.estimation_over_forward"] = r["estimation_images_per_s"] / r["forward"]["rate"]
        for k, a in r["attribution"].items():
            if "of_bound" in a:
                out[f"{name}.attr_{k}_of_bound"] = a["of_bound"]
    return out


def markdown(doc: dict) -> str:
    """The real-model table with the issue's targets next to each row."""
    rows = ["| model | measurement | value | target |", "|---|---|---|---|"]
    for name, r in doc["models"].items():
        e = r["estimation"]
        ph = e["phases_s"]
        rows += [
            f"| {name} | forward, images/s (B={r['forward']['units']:.0f}) | {r['forward']['rate']:.2f} | |",
            f"| {name} | estimation (statistics), images/s | {r['estimation_images_per_s']:.2f} | |",
            f"| {name} | estimation GEMM fraction | {r['gemm_fraction']:.0%} | |",
            f"| {name} | time to a saved store, s ({e['images']} images, 1 class) | {e['to_saved_store_s']:.1f} "
            f"(statistics {ph.get('statistics', 0):.1f}, patterns {ph.get('patterns', 0):.2f}, "
            f"fingerprint {ph.get('fingerprint', 0):.2f}, save {ph.get('save', 0):.2f}) | |",
            f"| {name} | patterns, fraction of copy bandwidth ({r['copy_bandwidth'] / 1e9:.1f} GB/s) | "
            f"{r['patterns_bandwidth_fraction']:.0%} | ≥ 50% |",
            f"| {name} | patterns of `{r['largest_layer']['name']}` ({r['largest_layer']['weights'] / 1e6:.0f}M "
            f"weights), fraction of bandwidth | {r['largest_layer']['bandwidth_fraction']:.0%} | ≥ 50% (fc6) |",
            f"| {name} | peak RSS / (accumulators + one batch) | {r['rss_over_budget']:.2f} | ≤ 1.10 |",
        ]
        for k, a in r["attribution"].items():
            value = (f"{a['over_saliency']:.2f}× = {a['of_bound']:.0%} of {a['bound']:.2f}×" if "of_bound" in a
                     else f"{a['ours']['rate']:.2f} pairs/s (Saliency skipped: {a['saliency']['skipped']})")
            rows.append(f"| {name} | attribution {k} vs Captum Saliency | {value} | ≥ 95% of bound |")
    m = doc["machine"]
    head = (f"Commit {doc['commit']}, {m['cpu']} ({m['cores']} cores, {m['threads']} threads), torch {m['torch']}, "
            f"backend {doc['backend']['name']}, load average {m['loadavg_1_5_15'][0]:.1f} at start{' (quick sizes: not comparable)' if doc['quick'] else ''}.")
    return head + "\n\n" + "\n".join(rows) + "\n"


def append_history(path: Path, doc: dict) -> None:
    """Append one line (commit, machine, date, key ratios) to the history file (rewritten atomically)."""
    line = {"date": doc["date"], "commit": doc["commit"], "cpu": doc["machine"]["cpu"],
            "threads": doc["machine"]["threads"], "quick": doc["quick"], "ratios": key_ratios(doc["models"])}
    old = path.read_bytes() if path.exists() else b""
    atomic_write(path, lambda f: f.write(old + (json.dumps(line) + "\n").encode()))


def plot_trend(history: Path, out: Path) -> None:
    """Redraw the trend plot of every key ratio over the history's full-size runs (quick runs skipped)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(l) for l in history.read_text().splitlines() if l.strip()]
    full = [r for r in runs if not r["quick"]] or runs
    keys = sorted({k for r in full for k in r["ratios"]})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in keys:
        pts = [(i, r["ratios"][key]) for i, r in enumerate(full) if key in r["ratios"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax.set_xticks(range(len(full)), [f"{r['commit'][:7]}\n{r['date'][5:10]}" for r in full], fontsize=7)
    ax.set_ylabel("ratio (definitions: benchmarks/README.md)")
    ax.set_title("untangle_ext real-model benchmarks: key ratios per run")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.realmodels", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="width/16 at 32×32, 2 images (< 1 min idle; not comparable)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--tag", default=None, help="file name of the .json/.md (default: realmodels[-quick])")
    p.add_argument("--no-history", action="store_true", help="do not append to history.jsonl")
    p.add_argument("--no-attribution", action="store_true", help="skip attribution (VGG-16 k = 10 is ~50 forwards)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = {**sizes(args.quick), "topk": [] if args.no_attribution else sizes(args.quick)["topk"]}
    if args.worker:  # child: one model, JSON on the last stdout line
        print(json.dumps(run_model(args.worker, cfg)))
        return 0
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"schema": "untangle_ext-realmodels/1", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "commit": git_revision(), "machine": machine_info(), "backend": dataclasses.asdict(backend()),
           "quick": args.quick, "config": cfg, "models": {}}
    for name in args.models:
        cmd = [sys.executable, "-m", "benchmarks.realmodels", "--worker", name]
        cmd += [flag for flag, on in (("--quick", args.quick), ("--no-attribution", args.no_attribution)) if on]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            raise SystemExit(f"realmodels worker {name} failed:\n{proc.stderr[-3000:]}")
        doc["models"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
    tag = args.tag or ("realmodels-quick" if args.quick else "realmodels")
    write_atomic(out / f"{tag}.json", json.dumps(doc, indent=1))
    write_atomic(out / f"{tag}.md", markdown(doc))
    if not args.no_history:
        append_history(out / HISTORY, doc)
        plot_trend(out / HISTORY, out / "trend.png")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
