"""Per-class lock files: concurrent estimations into one prefix never clobber or duplicate a class.

A lock is an advisory ``flock`` on a hidden file next to the store
(``.{store name}.lock``). The kernel drops it when its holder exits for any
reason, SIGKILL included, so a killed run never leaves a stale lock behind:
the next run simply takes it. A released lock file is deleted. Where
``fcntl`` is missing (Windows) locks are no-ops: writes stay atomic, but two
processes may then estimate the same class twice.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class ClassLockTimeout(TimeoutError):
    """Another process held a class's lock for longer than the caller was willing to wait."""


def lock_path(store_path: os.PathLike | str) -> Path:
    """The hidden lock file of one store file."""
    store_path = Path(store_path)
    return store_path.with_name(f".{store_path.name}.lock")


def holder(store_path: os.PathLike | str) -> str:
    """Who holds the lock, as its holder wrote it ("pid 123 on host x"), for messages."""
    try:
        return lock_path(store_path).read_text()[:200].strip() or "an unknown process"
    except OSError:
        return "an unknown process"


class ClassLock:
    """An exclusive lock on one store file; use as a context manager."""

    def __init__(self, path: Path, fd: Optional[int]):
        self.path = path
        self._fd = fd

    @classmethod
    def try_acquire(cls, store_path: os.PathLike | str, enabled: bool = True) -> Optional["ClassLock"]:
        """The lock if it is free now, else ``None`` (never blocks)."""
        path = lock_path(store_path)
        if not enabled or fcntl is None:
            return cls(path, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EWOULDBLOCK: held by someone else
                os.close(fd)
                return None
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
                return cls(path, fd)
            os.close(fd)  # we locked a file its holder just deleted on release: try the new one

    @classmethod
    def acquire(cls, store_path: os.PathLike | str, timeout: Optional[float] = None, poll: float = 0.2,
                enabled: bool = True, on_wait: Optional[Callable[[], None]] = None) -> "ClassLock":
        """Wait (polling) until the lock is free; ``timeout`` seconds, or forever when ``None``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False
        while True:
            lock = cls.try_acquire(store_path, enabled)
            if lock is not None:
                return lock
            if deadline is not None and time.monotonic() >= deadline:
                raise ClassLockTimeout(
                    f"{store_path} is still being estimated by {holder(store_path)} after {timeout} s "
                    f"(lock file {lock_path(store_path)}); wait for that process, or stop it and rerun")
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            time.sleep(poll)

    def release(self) -> None:
        """Delete the lock file (while still holding it) and unlock."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "ClassLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
