"""Cost of the precision changes (issue 11): estimation throughput of this tree against an older one, alternating.

    git archive 17e90c3 | tar -x -C /tmp/before && (cd /tmp/before && python setup.py build_ext --inplace)
    OMP_NUM_THREADS=1 python -m benchmarks.precision_cost --before /tmp/before --rounds 5

Each round runs one process per tree (before, after, before, ...), each timing the moment
accumulation (``Moments.update`` for 10 class slots, mixed labels) of LeNet on bundled MNIST at
batch 16 and 256 and of the VGG-style net at batch 64 (one batch), on one thread, after a warm-up.
The ``before`` process sets ``F64_MAX_PRODUCTS = 0`` (float32 products everywhere, as before issue 11).
Prints the median images/s per tree and the after/before ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def _rate(moments_mod, program_cls, net, x, labels, batch: int) -> float:
    mom = moments_mod.Moments(program_cls(net), 10)
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], batch):
        mom.update(x[i:i + batch], labels[i:i + batch])
    for lm in mom.layers.values():
        lm.flush()
    return x.shape[0] / (time.perf_counter() - t0)


def child(before: bool, only: list[str]) -> dict[str, float]:
    """Images/s per workload in this process (the tree first on sys.path)."""
    import torch

    torch.set_num_threads(1)
    import untangle_ext.moments as moments

    assert Path(moments.__file__).is_relative_to(Path(os.environ["PYTHONPATH"])), moments.__file__
    from untangle_ext.data import load_mnist_sample
    from untangle_ext.models import load_or_train_lenet
    from untangle_ext.trace import Program

    from benchmarks import workloads

    if before:
        moments.F64_MAX_PRODUCTS = 0
    lenet, _ = load_or_train_lenet(str(HERE / ".cache" / "lenet_mnist.pt"), progress=False)
    x, y = load_mnist_sample("test")
    torch.manual_seed(0)
    vx = torch.randn(64, 3, 64, 64)
    runs = {"LeNet b16": (lenet, x[:256], y[:256], 16), "LeNet b256": (lenet, x[:512], y[:512], 256),
            "VGG-style b64": (workloads.vgg(), vx, torch.arange(64) % 10, 64)}
    out = {}
    for name, (net, xs, ys, b) in runs.items():
        if only and not any(name.startswith(o) for o in only):
            continue
        _rate(moments, Program, net, xs[:8], ys[:8], b)  # warm-up
        out[name] = _rate(moments, Program, net, xs, ys, b)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="the older tree (its extension built in place)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=[], help="workload name prefixes, e.g. LeNet")
    parser.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child == "before", args.only)))
        return
    if args.before is None:
        parser.error("--before PATH is required (see the module docstring)")
    trees = {"before": args.before.resolve(), "after": HERE}
    rates: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for label, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=str(tree), UNTANGLE_EXT_BACKEND="native")
            cmd = [sys.executable, __file__, "--child", label, "--only", *args.only]
            res = subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True)
            rates[label].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {label}: {rates[label][-1]}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}; median images/s over {args.rounds} alternating rounds:")
    for name in rates["after"][0]:
        b, a = (statistics.median(run[name] for run in rates[k]) for k in ("before", "after"))
        print(f"  {name}: before {b:.1f}, after {a:.1f}, after/before {a / b:.3f}")


if __name__ == "__main__":
    main()
