"""One measuring process of the suite: ``python -m benchmarks.worker ROLE CONFIG_JSON``.

ROLE is ``baselines`` (stores shared by the run, agreement checks, naive / seed-style / Captum
timings; default backend) or ``backend`` (the library's own timings under whatever
``UNTANGLE_EXT_BACKEND`` the parent set). Every finished task prints one line
``@@BENCH {json}`` on stdout; the parent collects them and drives the progress bar.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Callable, Iterator

import torch

PREFIX = "@@BENCH "


def emit(task: str, **record) -> None:
    """Report one finished task to the parent."""
    print(PREFIX + json.dumps({"task": task, **record}), flush=True)


def run_task(task: str, fn: Callable[[], dict]) -> None:
    """Run one task and emit its result, or its error (the other tasks still run)."""
    start = time.perf_counter()
    try:
        record = fn()
    except Exception as e:  # a broken task must not hide every other number
        traceback.print_exc(file=sys.stderr)
        record = {"error": f"{type(e).__name__}: {e}"}
    emit(task, **record, task_wall_s=time.perf_counter() - start)


# ---------------------------------------------------------------- baselines role

def prepare_stores(cfg: dict) -> dict:
    """Estimate every class of both models once and save the stores for the attribution tasks."""
    from untangle_ext import SignalEstimator
    from untangle_ext.store import class_store_path

    from . import workloads as W

    out = {}
    for name in ("lenet", "vgg"):
        model = W.model(name, cfg)
        x, y = W.images(name, cfg["prepare_images"][name], cfg)
        start = time.perf_counter()
        stores = SignalEstimator(model, progress=False).fit(W.batches(x, y, 256 if name == "lenet" else 64))
        out[name] = {"fit_s": time.perf_counter() - start, "images": x.shape[0], "classes": sorted(stores)}
        prefix = W.store_prefix(cfg, name)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for c, store in stores.items():
            store.save(class_store_path(prefix, c))
    return out


def agreement(cfg: dict) -> dict:
    """Max relative differences: baselines' patterns and attributions vs the library (LeNet, small case).

    Estimation is compared in float64 (model, data and stores) and without the conditioning limits
    (the baselines implement eq. 4 / eq. 8 as written: an ill-conditioned neuron that the default
    ``kappa_max`` zeroes is kept), so only the formulas are compared, not float32 rounding or the limits;
    attribution in float32 with the prepare task's stores.
    """
    from untangle_ext import Attributor, SignalEstimator

    from . import baselines as B
    from . import workloads as W

    n = cfg["agreement_images"]
    model64 = W.lenet().double()
    x, y = W.images("lenet", n, cfg)
    stores = SignalEstimator(model64, progress=False, store_dtype=torch.float64,
                             kappa_max=sys.float_info.max).fit(W.batches(x.double(), y, 16))
    naive = B.NaiveNeuronLoop(model64, range(W.NUM_CLASSES))
    for xb, yb in W.batches(x.double(), y, 16):
        naive.update(xb, yb)
    seed = B.seed_style_estimate(model64, W.by_class(x.double(), y))
    mods = B.affine_modules(model64)

    def worst(stats) -> float:
        err = 0.0
        for (c, name), st in stats.items():
            if c not in stores:  # a class absent from the sample: nothing to compare
                continue
            for key, a in B.raw_patterns(st, mods[name].weight.detach()).items():
                ours = stores[c].patterns[name][key]
                err = max(err, float((a - ours).abs().max() / ours.abs().max().clamp(min=1e-300)))
        return err

    model = W.lenet()
    stores32 = load_stores(cfg, "lenet")  # every class (the prepare task's fit)
    attributor = Attributor(model, stores32)
    xs, k = x[:4], 2
    ours = attributor.explain(xs, topk=k).attributions
    seed_attr = B.seed_style_attribute(model, reverse_weights(model, stores32), xs, k)
    result = {"images": n, "naive_patterns": worst(naive.stats()), "seed_style_patterns": worst(seed),
              "seed_style_attribution": rel_err(seed_attr, ours)}
    if captum_missing() is None:
        grad = attributor.explain(xs, topk=k, method="gradient").attributions
        result["captum_saliency_vs_gradient"] = rel_err(B.captum_saliency(model, xs, k), grad)
    return result


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def reverse_weights(model, stores) -> dict:
    """Per class, per layer ``W ⊙ a⁺`` (PatternAttribution's reverse weights) for the seed-style baseline."""
    from . import baselines as B

    mods = B.affine_modules(model)
    with torch.no_grad():
        return {c: {n: s.patterns[n]["a_pos"].to(mods[n].weight) * mods[n].weight for n in mods}
                for c, s in stores.items()}


def load_stores(cfg: dict, name: str) -> dict:
    from untangle_ext.store import load_class_stores

    from . import workloads as W

    return load_class_stores(W.store_prefix(cfg, name), range(W.NUM_CLASSES))


def captum_missing() -> "str | None":
    """None when Captum imports, else why not (the Captum columns are then skipped)."""
    try:
        import captum.attr  # noqa: F401
    except ImportError as e:
        return f"captum is not installed ({e}); `pip install captum` into the venv to include it"
    return None


def naive_estimation(cfg: dict, est: dict) -> dict:
    """Naive per-neuron loop throughput (images/s) at this workload's batch size."""
    from . import baselines as B
    from . import workloads as W
    from .measure import time_repeats

    model = W.model(est["model"], cfg)
    x, y = W.images(est["model"], est["naive_images"], cfg)
    loop = B.NaiveNeuronLoop(model, range(W.NUM_CLASSES))
    data = W.batches(x, y, min(est["batch"], x.shape[0]))
    run = lambda: [loop.update(xb, yb) for xb, yb in data]  # noqa: E731
    return time_repeats(run, x.shape[0], est["naive_repeats"], warmup=0)


def seed_estimation(cfg: dict, name: str) -> dict:
    """Seed-style estimation throughput (images/s): per-class deepcopy, one image at a time."""
    from . import baselines as B
    from . import workloads as W
    from .measure import time_repeats

    model = W.model(name, cfg)
    x, y = W.images(name, cfg["seed_est_images"][name], cfg)
    groups = W.by_class(x, y)
    return time_repeats(lambda: B.seed_style_estimate(model, groups), x.shape[0], cfg["seed_repeats"], warmup=0)


def captum_attribution(cfg: dict, att: dict) -> dict:
    """Captum Saliency throughput in (image·class)/s for B images × top-k."""
    missing = captum_missing()
    if missing:
        return {"skipped": missing}
    from . import baselines as B
    from . import workloads as W
    from .measure import time_repeats

    model = W.model(att["model"], cfg)
    x, _ = W.images(att["model"], att["batch"], cfg)
    k = att["topk"]
    return time_repeats(lambda: B.captum_saliency(model, x, k), x.shape[0] * k, att["repeats"])


def seed_attribution(cfg: dict, att: dict) -> dict:
    """Seed-style attribution throughput in (image·class)/s: deepcopy + autograd per pair."""
    from . import baselines as B
    from . import workloads as W
    from .measure import time_repeats

    model = W.model(att["model"], cfg)
    weights = reverse_weights(model, load_stores(cfg, att["model"]))
    x, _ = W.images(att["model"], att["seed_images"], cfg)
    k = att["topk"]
    run = lambda: B.seed_style_attribute(model, weights, x, k)  # noqa: E731
    return time_repeats(run, x.shape[0] * k, cfg["seed_repeats"], warmup=0)


def baseline_tasks(cfg: dict) -> Iterator[tuple[str, Callable[[], dict]]]:
    from untangle_ext import backend

    from .measure import machine_info

    info = backend()
    yield "machine", lambda: {**machine_info(), "backend": info.name, "backend_reason": info.reason}
    yield "prepare", lambda: prepare_stores(cfg)
    yield "agreement", lambda: agreement(cfg)
    for est in cfg["estimation"]:
        yield f"naive:{est['key']}", lambda est=est: naive_estimation(cfg, est)
    for name in ("lenet", "vgg"):
        yield f"seed_est:{name}", lambda name=name: seed_estimation(cfg, name)
    for att in cfg["attribution"]:
        yield f"captum:{att['key']}", lambda att=att: captum_attribution(cfg, att)
        yield f"seed_attr:{att['key']}", lambda att=att: seed_attribution(cfg, att)


# ---------------------------------------------------------------- backend role

def estimation(cfg: dict, est: dict, memory: bool) -> dict:
    """Streaming estimation throughput (images/s): ``Moments.update`` over in-memory batches, every
    class at once (the per-batch work of ``SignalEstimator.fit``; patterns are computed once at the
    end of a fit and timed separately by the prepare task). With ``memory``, also the peak RSS."""
    from untangle_ext.moments import Moments, accumulator_bytes
    from untangle_ext.trace import Program

    from . import workloads as W
    from .measure import current_rss, forward_profile, peak_rss, time_repeats

    model = W.model(est["model"], cfg)
    x, y = W.images(est["model"], est["images"], cfg)
    data = W.batches(x, y, est["batch"])
    profile = forward_profile(model, x)
    rss_before = current_rss()
    program = Program(model)
    moments = Moments(program, W.NUM_CLASSES)
    moments.update(*data[0])  # warm-up; fixes the shifts
    result = time_repeats(lambda: [moments.update(xb, yb) for xb, yb in data], x.shape[0], est["repeats"], 0)
    result.update(profile)
    if memory:
        acc = accumulator_bytes(program, W.NUM_CLASSES)
        result["memory"] = {"rss_before": rss_before, "peak_rss": peak_rss(), "accumulator_bytes": acc,
                            "activation_bytes_per_batch": profile["activation_bytes_per_image"] * est["batch"]}
    return result


def forward_only(cfg: dict, est: dict) -> dict:
    """Forward-only throughput (images/s) of the same model and batches, under ``torch.no_grad``."""
    from . import workloads as W
    from .measure import time_repeats

    model = W.model(est["model"], cfg)
    x, y = W.images(est["model"], est["images"], cfg)
    data = W.batches(x, y, est["batch"])

    def run() -> None:
        with torch.no_grad():
            for xb, _ in data:
                model(xb)
    return time_repeats(run, x.shape[0], est["repeats"])


def attribution(cfg: dict, att: dict) -> dict:
    """Our batched ``Attributor.explain`` throughput in (image·class)/s for B images × top-k."""
    from untangle_ext import Attributor

    from . import workloads as W
    from .measure import time_repeats

    model = W.model(att["model"], cfg)
    attributor = Attributor(model, load_stores(cfg, att["model"]))
    x, _ = W.images(att["model"], att["batch"], cfg)
    k = att["topk"]
    return time_repeats(lambda: attributor.explain(x, topk=k), x.shape[0] * k, att["repeats"])


def backend_tasks(cfg: dict, wanted: str) -> Iterator[tuple[str, Callable[[], dict]]]:
    from .measure import gemm_rate, machine_info

    try:
        from untangle_ext import backend
        info = backend()
    except Exception as e:  # e.g. UNTANGLE_EXT_BACKEND=native without an extension
        emit("backend", available=False, reason=f"{type(e).__name__}: {e}")
        return
    if info.name != wanted:
        emit("backend", available=False, reason=f"backend() is {info.name!r}: {info.reason}")
        return
    emit("backend", available=True, reason=info.reason, machine=machine_info())
    ests = sorted(cfg["estimation"], key=lambda e: e["model"] != "vgg")  # VGG first: a clean RSS peak
    for i, est in enumerate(ests):
        yield f"est:{est['key']}", lambda est=est, i=i: estimation(cfg, est, memory=i == 0)
        if i == 0:
            yield "gemm", lambda: gemm_rate(cfg["gemm_n"])
        yield f"forward:{est['key']}", lambda est=est: forward_only(cfg, est)
    for att in cfg["attribution"]:
        yield f"attr:{att['key']}", lambda att=att: attribution(cfg, att)


def main(argv: list[str]) -> int:
    role, cfg = argv[0], json.loads(argv[1])
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    tasks = baseline_tasks(cfg) if role == "baselines" else backend_tasks(cfg, role.split(":", 1)[1])
    for name, fn in tasks:
        run_task(name, fn)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
