"""Subprocess of the interruption/concurrency tests: estimate classes into a prefix, optionally blocking.

argv: prefix, classes ("0,1,2"), mode, ready_file, marker_dir. Modes: ``slow`` (creates ``ready_file``,
waits for ``ready_file + ".go"`` so that several workers start together, then sleeps 0.1 s per batch);
``class:C`` (block inside class C's loader after one batch); ``save:C`` (block halfway through writing class C).
Blocking first creates ``ready_file``, so the parent can SIGKILL at a known point. Each call of the loader
leaves a marker file ``{class}.{pid}`` in ``marker_dir``.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


from _hardening import class_batches, tiny_model  # noqa: E402
from untangle_ext import SignalEstimator  # noqa: E402

prefix, classes, mode, ready, marks = sys.argv[1:6]


def block() -> None:
    open(ready, "w").close()
    time.sleep(600)


if mode.startswith("save:"):
    from untangle_ext import store as store_mod

    real_write = store_mod._write_v2

    def partial_write(f, data, dtype):
        if data.get("class_id") == int(mode[5:]):
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{ half a store")
            f.flush()
            os.fsync(f.fileno())
            block()
        return real_write(f, data, dtype)

    store_mod._write_v2 = partial_write

if mode == "slow":
    open(ready, "w").close()
    while not os.path.exists(ready + ".go"):
        time.sleep(0.02)


def loader_fn(c):
    open(os.path.join(marks, f"{c}.{os.getpid()}"), "w").close()
    for i, batch in enumerate(class_batches(c)):
        if mode == f"class:{c}" and i == 1:
            block()
        if mode == "slow":
            time.sleep(0.1)
        yield batch


written = SignalEstimator(tiny_model(), classes=[int(c) for c in classes.split(",")], progress=False).fit_to_files(
    prefix, loader_fn)
print("written", sorted(written))
