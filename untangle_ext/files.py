"""The file policy of per-class estimation: resume, locks, orphaned temp files, and who writes what.

* Resume: a class whose store exists and is valid for this model is skipped
  (with ``overwrite``, only files written by this run count).
* Locks: each class is estimated under a lock file, so processes sharing a
  prefix split the classes; a class another process holds is waited for at the
  end (up to ``lock_timeout`` s) instead of being estimated twice.
* Orphans: temp files a killed writer left behind are removed under the lock.
* Under torch.distributed the ranks split the classes (:func:`distributed.class_share`):
  each rank decides, estimates and writes its own classes (the prefix must be
  visible to every rank), then all ranks meet on a barrier.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

from . import distributed
from ._io import remove_orphan_temps
from .locking import ClassLock
from .store import SignalStore, StoreError, class_store_path

if TYPE_CHECKING:
    from .estimator import SignalEstimator

#: Estimates the given classes, yielding ``(class, store)`` as each is done.
Estimate = Callable[[Sequence[int]], Iterator[tuple[int, SignalStore]]]
#: Classes locked and estimated together by one pass over a labelled data set (file descriptors are finite).
LOCKS_PER_PASS = 64


def not_current(est: "SignalEstimator", path: Path, class_id: int, fresh_since: Optional[int]) -> Optional[str]:
    """Why ``path`` is not a valid store of ``class_id`` for this model (written after ``fresh_since``), or None."""
    try:
        if fresh_since is not None and path.stat().st_mtime_ns < fresh_since:
            return "overwrite=True"
        SignalStore.load(path, expected_class=class_id).check_matches(est.program, est.fingerprint)
    except (OSError, StoreError) as exc:
        return str(exc)
    return None


def write_class_stores(est: "SignalEstimator", prefix: "os.PathLike[str] | str", estimate: Estimate,
                       overwrite: bool = False, lock_timeout: Optional[float] = None,
                       group: int = 1) -> dict[int, Path]:
    """Estimate and write this process's share of ``est.classes`` (see the module doc); every class's path.

    ``group``: classes locked and passed to ``estimate`` together (1 for per-class loaders, so
    processes sharing a prefix interleave; :data:`LOCKS_PER_PASS` for one pass over a labelled data set).
    """
    fresh_since = time.time_ns() if overwrite else None  # with overwrite, only files written from now count
    path = lambda c: class_store_path(prefix, c)  # noqa: E731
    mine = distributed.class_share(est.classes)
    use_locks = distributed.current() is None
    done = [c for c in mine if not_current(est, path(c), c, fresh_since) is None]
    todo = [c for c in mine if c not in done]
    with distributed.disabled():  # each rank estimates its classes whole and alone
        busy = []
        for start in range(0, len(todo), group):
            busy += _pass(est, todo[start:start + group], path, estimate, fresh_since, use_locks, done)
        for c in busy:  # held by another process: wait, then take it unless that process finished it
            with ClassLock.acquire(path(c), lock_timeout):
                if not_current(est, path(c), c, fresh_since) is None:
                    done.append(c)
                else:
                    _prepare(est, path(c), c, fresh_since)
                    done += _write(est, estimate([c]), path, lambda c: None)
    distributed.barrier()
    return {c: path(c) for c in distributed.gather_classes(done, est.num_classes)}


def _pass(est: "SignalEstimator", classes: list[int], path, estimate: Estimate, fresh_since: Optional[int],
          use_locks: bool, done: list[int]) -> list[int]:
    """Lock what can be locked now and estimate it in one go; return the classes another process holds."""
    busy, locks = [], {}
    try:
        for c in classes:
            lock = ClassLock.try_acquire(path(c), enabled=use_locks)
            if lock is None:
                busy.append(c)
            elif not_current(est, path(c), c, fresh_since) is None:  # another process finished it meanwhile
                lock.release()
                done.append(c)
            else:
                locks[c] = lock
                _prepare(est, path(c), c, fresh_since)
        if locks:
            done += _write(est, estimate(list(locks)), path, lambda c: locks.pop(c).release())
    finally:
        for lock in locks.values():  # classes without samples, or an error: free what is still held
            lock.release()
    return busy


def _prepare(est: "SignalEstimator", path: Path, class_id: int, fresh_since: Optional[int]) -> None:
    """Under the lock: say why an existing file is replaced, and remove a killed writer's temp files."""
    if fresh_since is None and path.exists():
        warnings.warn(f"replacing {path}: {not_current(est, path, class_id, fresh_since)}", UserWarning, stacklevel=4)
    remove_orphan_temps(path)


def _write(est: "SignalEstimator", stores: Iterator[tuple[int, SignalStore]], path,
           written_hook: Callable[[int], None]) -> list[int]:
    """Save each store as it arrives (a killed run keeps every finished class), then ``written_hook(class)``."""
    written = []
    for c, store in stores:
        store.save(path(c), dtype=est.file_dtype, keep=est.keep)
        written.append(c)
        written_hook(c)
    return written
