"""Store files (SPEC §4): metadata, specific errors, no code on load, atomic writes, interruption, concurrency."""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _hardening import NUM_CLASSES, class_batches, tiny_model
from untangle_ext import Attributor, SignalEstimator
from untangle_ext import store as store_mod
from untangle_ext.locking import ClassLock, ClassLockTimeout, lock_path
from untangle_ext.store import (FORMAT_VERSION, StoreKeyError, SignalStore, StoreArchitectureError, StoreClassMismatchError,
                                StoreCorruptError, StoreError, StoreMissingError, StoreModelMismatchError,
                                StoreTooLargeError, StoreUnsafeError, StoreVersionError, StoreWeightsError,
                                class_store_path, load_class_stores, model_fingerprint)

WORKER = Path(__file__).with_name("_estimate_worker.py")
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture
def saved(stores, tmp_path) -> Path:
    return stores[0].save(class_store_path(tmp_path / "net", 0))


def resave(path: Path, **changes) -> Path:
    """Rewrite a valid v2 store file with some header fields changed (bypassing save's validation)."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["header"])
    for key, value in changes.items():
        if key in ("format", "format_version"):
            meta[key] = str(value)
        else:
            header[key] = value
    save_file(tensors, str(path), metadata={**meta, "header": json.dumps(header)})
    return path


def test_roundtrip_keeps_every_field(model, stores, saved):
    loaded = SignalStore.load(saved, expected_class=0)
    s = stores[0]
    assert (loaded.class_id, loaded.fingerprint, loaded.num_samples) == (0, model_fingerprint(model), s.num_samples)
    assert loaded.layers == [{"name": "0", "kind": "conv2d", "weight_shape": [2, 1, 3, 3]},
                             {"name": "4", "kind": "linear", "weight_shape": [3, 8]}]
    assert loaded.estimator == {"mean_y": "all", "per_class": True, "store_dtype": "float16", "kappa_max": 1e6,
                                "min_samples": 1}
    assert loaded.input_shape == [1, 6, 6] and loaded.library_version == store_mod.__version__
    assert saved.read_bytes()[8:9] == b"{"  # a safetensors file under the tutorial's .pkl name
    with safe_open(str(saved), framework="pt") as f:
        assert f.metadata()["format_version"] == str(FORMAT_VERSION) == "2"
        assert f.metadata()["format"] == store_mod.FORMAT
        per_layer = ["a_pos", "a_pos/exp", "kappa_lin", "kappa_neg", "kappa_pos", "n", "n_pos"]  # κ: a few bytes
        assert sorted(f.keys()) == [f"{layer}/{key}" for layer in "01" for key in per_layer]
        assert f.get_tensor("0/a_pos").dtype == torch.float16
    written = s.encoded()
    assert {n: sorted(p) for n, p in loaded.patterns.items()} == {
        n: ["a_pos", "kappa_lin", "kappa_neg", "kappa_pos", "n", "n_pos"] for n in s.patterns}
    for name, p in written.patterns.items():
        for key, v in p.items():
            assert torch.equal(loaded.patterns[name][key], v)
        rel = (p["a_pos"] - s.patterns[name]["a_pos"]).norm() / s.patterns[name]["a_pos"].norm()
        assert 0 < rel < 1e-3  # rounded to float16 (2**-11 relative per value), not exact
    loaded.check_matches(SignalEstimator(model, progress=False).program, model_fingerprint(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_save_options_keep_all_and_dtypes(stores, tmp_path, dtype):
    s = stores[0]
    loaded = SignalStore.load(s.save(tmp_path / "all_class_0.pkl", dtype=dtype, keep=store_mod.PATTERN_KEYS))
    for name, p in s.patterns.items():
        for key, v in p.items():
            got = loaded.patterns[name][key]
            if key.startswith("a_") and dtype == torch.bfloat16:
                assert got.dtype == torch.float32 and 0 < float((got - v).norm() / v.norm()) < 8e-3
            else:
                assert torch.equal(got, v.to(got.dtype)) and got.dtype == (dtype if key.startswith("a_") else v.dtype)


def test_half_storage_keeps_tiny_and_huge_patterns(stores, tmp_path):
    """Per-neuron power-of-two exponents: values far outside float16's range round-trip to float16 precision."""
    s = SignalStore(**{**stores[0].__dict__, "path": None})
    s.patterns = {n: dict(p) for n, p in s.patterns.items()}
    a = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    s.patterns["4"]["a_pos"] = a * torch.tensor([1e-30, 1.0, 1e30]).view(3, 1)
    loaded = SignalStore.load(s.save(tmp_path / "range_class_0.pkl")).patterns["4"]["a_pos"]
    want = s.patterns["4"]["a_pos"]
    for k in range(3):
        assert 0 < float((loaded[k].double() - want[k].double()).norm() / want[k].double().norm()) < 1e-3


def test_missing_pattern_is_a_key_error(saved, model):
    with pytest.raises(StoreKeyError, match="holds no \\['a_lin'\\] patterns") as err:
        SignalStore.load(saved, keys=("a_lin",))
    assert str(saved) in str(err.value) and "keep=" in str(err.value)
    with pytest.raises(StoreKeyError, match="a_lin"):
        Attributor(model, {0: SignalStore.load(saved)}).explain(torch.zeros(1, 1, 6, 6), target=0, estimator="linear")


def test_reads_version_1_files(model, stores, tmp_path):
    """Stores written by earlier versions (torch zip archives) still load, every field intact."""
    path = tmp_path / "old_class_0.pkl"
    torch.save(stores[0].to_dict(), path)
    loaded = SignalStore.load(path, expected_class=0)
    for name, p in stores[0].patterns.items():
        for key, v in p.items():
            assert torch.equal(loaded.patterns[name][key], v)
    assert torch.equal(Attributor(model, {0: loaded}).explain(torch.ones(2, 1, 6, 6), target=0).attributions,
                       Attributor(model, {0: stores[0]}).explain(torch.ones(2, 1, 6, 6), target=0).attributions)


def test_changed_weights_is_a_weights_error(saved):
    other = tiny_model(seed=1)
    store = SignalStore.load(saved)
    with pytest.raises(StoreWeightsError, match="different model weights") as err:
        Attributor(other, {0: store})
    assert str(saved) in str(err.value) and "checkpoint" in str(err.value)
    assert isinstance(err.value, StoreModelMismatchError)


def test_changed_architecture_is_an_architecture_error(saved):
    wider = tiny_model(hidden=3)
    with pytest.raises(StoreArchitectureError, match="another architecture") as err:
        Attributor(wider, {0: SignalStore.load(saved)})
    assert str(saved) in str(err.value) and "[3, 1, 3, 3]" in str(err.value)


def test_store_of_another_class_is_a_class_error(saved, model, tmp_path):
    renamed = class_store_path(tmp_path / "net", 1)
    shutil.copy(saved, renamed)
    with pytest.raises(StoreClassMismatchError, match="holds the patterns of class 0, not of class 1") as err:
        load_class_stores(tmp_path / "net", [0, 1])
    assert str(renamed) in str(err.value)
    with pytest.raises(StoreClassMismatchError, match="class 0, not of class 2"):
        Attributor(model, {2: SignalStore.load(saved)})


def test_unknown_format_version(saved):
    resave(saved, format_version=FORMAT_VERSION + 1, library_version="9.0.0")
    with pytest.raises(StoreVersionError, match=f"format version {FORMAT_VERSION + 1}") as err:
        SignalStore.load(saved)
    assert str(saved) in str(err.value) and "9.0.0" in str(err.value) and "upgrade" in str(err.value)


@pytest.mark.parametrize("cut", [0, 1, 100, 0.5, -1])
def test_truncated_file_is_corrupt(saved, cut):
    data = saved.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (len(data) + cut if cut < 0 else cut)
    saved.write_bytes(data[:n])
    with pytest.raises(StoreCorruptError, match="not a readable signal store|damaged") as err:
        SignalStore.load(saved)
    assert str(saved) in str(err.value) and "estimate the signals again" in str(err.value)


def test_random_bytes_and_other_files(tmp_path):
    random_file = tmp_path / "random_class_0.pkl"
    random_file.write_bytes(os.urandom(4096))
    with pytest.raises(StoreCorruptError, match="not a readable signal store"):
        SignalStore.load(random_file)
    plain = tmp_path / "plain_class_0.pkl"
    torch.save({"weights": torch.ones(2)}, plain)
    with pytest.raises(StoreCorruptError, match="not an untangle_ext signal store"):
        SignalStore.load(plain)
    save_file({"weights": torch.ones(2)}, str(plain))  # a model checkpoint in safetensors, not a store
    with pytest.raises(StoreCorruptError, match="not an untangle_ext signal store"):
        SignalStore.load(plain)
    with pytest.raises(StoreCorruptError, match="not a regular file"):
        SignalStore.load(tmp_path)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(StoreMissingError, match="does not exist; estimate the signals") as err:
        load_class_stores(tmp_path / "net", [4])
    assert isinstance(err.value, FileNotFoundError) and "net_class_4.pkl" in str(err.value)


def test_size_cap(saved):
    with pytest.raises(StoreTooLargeError, match="max_bytes=100"):
        SignalStore.load(saved, max_bytes=100)
    SignalStore.load(saved, max_bytes=None)


class _Payload:
    """Unpickling this calls ``Path.touch(target)``: code execution if a loader lets it through."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_no_code_runs_on_load(stores, tmp_path):
    target = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(target)))  # the payload is live: plain pickle runs it
    assert target.exists()
    target.unlink()
    hostile = stores[0].to_dict()
    hostile["library_version"] = _Payload(target)
    path = tmp_path / "hostile_class_0.pkl"
    torch.save(hostile, path)  # a real torch zip archive with a __reduce__ payload inside
    with pytest.raises(StoreUnsafeError, match="NOT executed") as err:
        SignalStore.load(path)
    assert str(path) in str(err.value) and "GLOBAL getattr" in str(err.value) and not target.exists()
    raw = tmp_path / "raw_class_0.pkl"
    raw.write_bytes(pickle.dumps(_Payload(target)))  # a bare pickle (not a zip) is refused before unpickling
    with pytest.raises(StoreCorruptError):
        SignalStore.load(raw)
    assert not target.exists()


def test_save_refuses_an_invalid_store(stores, tmp_path):
    bad = SignalStore(**{**stores[0].__dict__, "path": None})
    bad.patterns = {n: dict(p) for n, p in bad.patterns.items()}
    bad.patterns["4"]["a_pos"] = torch.full_like(bad.patterns["4"]["a_pos"], float("nan"))
    path = tmp_path / "nan_class_0.pkl"
    with pytest.raises(StoreCorruptError, match="a_pos contains NaN"):
        bad.save(path)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_old_file_and_no_temp(stores, saved, monkeypatch):
    before = saved.read_bytes()

    def broken_write(f, data, dtype):
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{ partial")
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "_write_v2", broken_write)
    with pytest.raises(OSError, match="disk full"):
        stores[0].save(saved)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_save_fsyncs_file_and_directory(stores, tmp_path, monkeypatch):
    kinds = []
    real = os.fsync

    def recording_fsync(fd):
        kinds.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(store_mod.os, "fsync", recording_fsync)
    path = stores[0].save(tmp_path / "x_class_0.pkl")
    assert kinds == ["file", "dir"]
    assert oct(path.stat().st_mode & 0o777) != "0o600"  # normal permissions, not mkstemp's private ones


# ------------------------------------------------------------------------------------------------------------
# interruption and concurrency (subprocesses)


class Worker:
    """One ``_estimate_worker.py`` subprocess; all of this module's workers start together (imports overlap)."""

    def __init__(self, root: Path, scenario: str, tag: str, classes: str, mode: str):
        self.dir = root / scenario
        (self.dir / "marks").mkdir(parents=True, exist_ok=True)
        self.prefix = self.dir / "stores" / "net"
        self.ready = self.dir / f"ready_{tag}"
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(self.prefix), classes, mode, str(self.ready), str(self.dir / "marks")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 180
        while not self.ready.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited early: {self.proc.communicate()}")
            assert time.monotonic() < deadline, "worker never reached its blocking point"
            time.sleep(0.02)

    def kill_when_ready(self) -> None:
        self.wait_ready()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        assert self.proc.returncode == -signal.SIGKILL

    def succeeds(self) -> None:
        out, err = self.proc.communicate(timeout=180)
        assert self.proc.returncode == 0, err


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    spec = {"kill_class": ("0,1,2", "class:2"), "kill_save": ("0,1", "save:1"),
            "diff_a": ("0,1", "slow"), "diff_b": ("2", "slow")}
    started = {name: Worker(root, name[:-2] if name[-2] == "_" and name[-1] in "ab" else name, name, classes, mode)
               for name, (classes, mode) in spec.items()}
    yield started
    for w in started.values():
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def _start_together(*ws: Worker) -> None:
    for w in ws:
        w.wait_ready()
    for w in ws:
        Path(str(w.ready) + ".go").touch()


def _visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("net"))


def _rerun(model, prefix, overwrite=False) -> list[int]:
    calls = []

    def loader_fn(c):
        calls.append(c)
        return class_batches(c)

    written = SignalEstimator(model, progress=False).fit_to_files(prefix, loader_fn, overwrite=overwrite)
    assert sorted(written) == list(range(NUM_CLASSES))
    for c, path in written.items():
        SignalStore.load(path, expected_class=c).check_matches(SignalEstimator(model, progress=False).program,
                                                               model_fingerprint(model))
    return calls


def test_sigkill_mid_class_keeps_earlier_classes_and_resumes(model, workers):
    w = workers["kill_class"]
    w.kill_when_ready()
    out, prefix = w.prefix.parent, w.prefix
    assert _visible(out) == ["net_class_0.pkl", "net_class_1.pkl"]
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    first = {c: class_store_path(prefix, c).read_bytes() for c in (0, 1)}
    for c in (0, 1):
        SignalStore.load(class_store_path(prefix, c), expected_class=c)
    assert _rerun(model, prefix) == [2]  # resume: finished classes are skipped
    assert {c: class_store_path(prefix, c).read_bytes() for c in (0, 1)} == first
    assert sorted(os.listdir(out)) == [f"net_class_{c}.pkl" for c in range(3)]  # no lock or temp files left
    assert _rerun(model, prefix, overwrite=True) == [0, 1, 2]


def test_sigkill_mid_write_leaves_no_partial_file(model, workers):
    w = workers["kill_save"]
    w.kill_when_ready()
    out, prefix = w.prefix.parent, w.prefix
    assert _visible(out) == ["net_class_0.pkl"]
    orphans = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(orphans) == 1 and orphans[0].startswith(".net_class_1.pkl.")  # hidden, never under a store name
    assert _rerun(model, prefix) == [1, 2]
    assert sorted(os.listdir(out)) == [f"net_class_{c}.pkl" for c in range(3)]  # the orphan was cleaned up


def test_rerun_replaces_a_store_of_other_weights(tmp_path):
    prefix = tmp_path / "net"
    old = tiny_model(seed=5)
    SignalEstimator(old, classes=[0], progress=False).fit_to_files(prefix, class_batches)
    with pytest.warns(UserWarning, match="replacing .*net_class_0.pkl: .*different model weights"):
        assert _rerun(tiny_model(), prefix) == [0, 1, 2]  # the class-0 file of other weights is not "done"


def test_two_processes_different_classes_same_prefix(model, workers):
    a, b = workers["diff_a"], workers["diff_b"]
    _start_together(a, b)
    a.succeeds()
    b.succeeds()
    assert _rerun(model, a.prefix) == []
    assert _visible(a.prefix.parent) == [f"net_class_{c}.pkl" for c in range(3)]


def test_two_writers_of_the_same_classes_share_the_work(model, tmp_path):
    """Two estimations of the same classes at once (threads: flock treats each open file like a process)."""
    prefix = tmp_path / "net"
    calls: list[int] = []
    go = threading.Barrier(2)

    def loader_fn(c):
        calls.append(c)
        for batch in class_batches(c):
            time.sleep(0.05)
            yield batch

    def run(estimator):
        go.wait()
        estimator.fit_to_files(prefix, loader_fn)

    # trace before the threads start: torch.fx tracing patches globals and is not thread-safe
    threads = [threading.Thread(target=run, args=(SignalEstimator(model, progress=False),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == [0, 1, 2]  # every class estimated exactly once, by one of the two
    assert _rerun(model, prefix) == []


def test_held_lock_times_out_and_a_dead_holders_lock_is_free(model, tmp_path):
    prefix = tmp_path / "net"
    path = class_store_path(prefix, 0)
    lock_path(path).write_text("pid 1 on host gone\n")  # a lock file whose holder died: no flock on it
    with ClassLock.acquire(path, timeout=1):
        other = ClassLock.try_acquire(path)
        assert other is None
        with pytest.raises(ClassLockTimeout, match="still being estimated") as err:
            SignalEstimator(model, classes=[0], progress=False).fit_to_files(prefix, class_batches, lock_timeout=0.3)
        assert str(lock_path(path)) in str(err.value)
    assert not lock_path(path).exists()


def test_waits_for_a_class_another_process_finishes(model, tmp_path):
    prefix = tmp_path / "net"
    path = class_store_path(prefix, 0)
    lock = ClassLock.try_acquire(path)
    calls = []

    def finish_elsewhere():
        time.sleep(0.5)
        elsewhere.fit(class_batches(0))[0].save(path)
        lock.release()

    elsewhere = SignalEstimator(model, classes=[0], progress=False)  # traced here: fx tracing is not thread-safe
    estimator = SignalEstimator(model, progress=False)
    helper = threading.Thread(target=finish_elsewhere)
    helper.start()
    written = estimator.fit_to_files(
        prefix, lambda c: calls.append(c) or class_batches(c))
    helper.join()
    assert sorted(written) == [0, 1, 2] and calls == [1, 2]  # class 0 was taken from the other "process"


def test_store_errors_are_value_errors():
    for cls in (StoreCorruptError, StoreVersionError, StoreWeightsError, StoreClassMismatchError):
        assert issubclass(cls, StoreError) and issubclass(cls, ValueError)
