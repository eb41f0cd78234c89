"""Compare two source trees of untangle_ext in lock step: is a change faster or slower?

    python benchmarks/lockstep.py --trees OLD_TREE NEW_TREE --workload attr:lenet16 --rounds 60

Each tree runs in its own persistent single-thread worker (``PYTHONPATH=<tree>``; build the old
tree's extension in place first: ``python setup.py build_ext --inplace``). The parent asks them
for one timing each in turn (ABAB..., the order flipped every round), so both see the same load;
each timing is the *CPU time* of the work (``time.process_time``), which a busy machine inflates
far less than wall time. Prints the medians and the median of the paired ratios NEW/OLD.

Workloads: ``attr:`` (``Attributor.explain``, top-3) or ``est:`` (``Moments.update``, 10 classes,
mixed labels: the per-batch work of estimation) on ``lenet16``, ``lenet256`` or ``vgg64``. Only
public API that both trees have is used.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

REPEATS = {"lenet16": 5, "lenet256": 2, "vgg64": 1}


def _setup(workload: str):
    """The timed call of ``workload`` (in the worker, importing the tree under test)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from untangle_ext import Attributor, SignalEstimator
    from untangle_ext.models import LeNet, vgg_style_net
    from untangle_ext.moments import Moments
    from untangle_ext.trace import Program

    kind, net = workload.split(":")
    torch.manual_seed(0)
    model, shape, batch = (LeNet(), (1, 28, 28), int(net[5:])) if net.startswith("lenet") else \
        (vgg_style_net(), (3, 64, 64), 64)
    model.eval()
    x = torch.randn(batch, *shape)
    if kind == "est":
        moments = Moments(Program(model), 10)
        slots = torch.arange(batch) % 10
        return lambda: moments.update(x, slots)
    data = TensorDataset(torch.randn(64, *shape), torch.arange(64) % 10)
    attributor = Attributor(model, SignalEstimator(model, progress=False).fit(DataLoader(data, batch_size=32)))
    return lambda: attributor.explain(x, topk=3)


def worker(workload: str) -> None:
    """Answer every line on stdin with the median CPU seconds of the workload's repeats."""
    import warnings

    import torch
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    fn = _setup(workload)
    for _ in range(3):
        fn()
    print("ready", flush=True)
    for _ in sys.stdin:
        times = []
        for _ in range(REPEATS[workload.split(":")[1]]):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        print(statistics.median(times), flush=True)


def compare(trees: list[str], workload: str, rounds: int) -> dict:
    """Lock-step timings of ``workload`` in both trees: medians (ms) and the median paired ratio."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", workload],
                              cwd=tree, env=dict(env, PYTHONPATH=tree), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for tree in trees]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a worker did not start (see its stderr above): {p.args}")
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            procs[i].stdin.write("go\n")
            procs[i].stdin.flush()
            times[i].append(float(procs[i].stdout.readline()))
    for p in procs:
        p.stdin.close()
        p.wait()
    old, new = (statistics.median(t) * 1e3 for t in times)
    paired = statistics.median(b / a for a, b in zip(*times))
    return {"workload": workload, "old_ms": old, "new_ms": new, "new_over_old": paired,
            "rounds": rounds, "load": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", nargs=2, metavar=("OLD", "NEW"), help="two source trees (repository roots)")
    p.add_argument("--workload", nargs="+", default=["attr:lenet16", "attr:lenet256", "attr:vgg64"])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    if not args.trees:
        p.error("--trees OLD NEW is required")
    for w in args.workload:
        r = compare(args.trees, w, args.rounds)
        print(f"{w:15s} old {r['old_ms']:9.2f} ms  new {r['new_ms']:9.2f} ms  new/old {r['new_over_old']:.3f} "
              f"(median of {r['rounds']} paired CPU-time ratios; load {r['load'][0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
