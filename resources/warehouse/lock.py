"""The cross-process writer lock: one ``flock`` on ``<lake>/.writer.lock``.

Dagster's ``warehouse`` pool serializes writers inside Dagster; this lock also covers what the pool
cannot see: a CLI writer, a second Dagster instance, or a test process, on the same machine.

Invariants:
- at most one process holds the lock; inside a process it is re-entrant (a write helper called while
  the caller already holds it does not deadlock on itself), and threads queue on an RLock first;
- the kernel drops the lock when the holder dies (even by SIGKILL), so a crash never leaves a stale
  lock to clean up by hand;
- the lock file holds only the holder's pid and start time, never anything about the data.
"""

import contextlib
import datetime as dt
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class WriterBusyError(TimeoutError):
    """Another process held the lake's writer lock for longer than the timeout."""


class _Held:
    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.fd: int | None = None
        self.depth = 0


_registry: dict[Path, _Held] = {}
_registry_guard = threading.Lock()


def _held_for(path: Path) -> _Held:
    with _registry_guard:
        return _registry.setdefault(path, _Held())


def held_by_this_process(path: Path) -> bool:
    held = _registry.get(path.resolve())
    return held is not None and held.depth > 0


@contextlib.contextmanager
def writer_lock(path: Path, *, timeout: float, poll: float = 0.05) -> Iterator[None]:
    """Hold the exclusive writer lock at ``path``, waiting up to ``timeout`` seconds for it."""
    path = path.resolve()
    held = _held_for(path)
    deadline = time.monotonic() + timeout
    if not held.rlock.acquire(timeout=max(timeout, 0.0)):
        raise WriterBusyError(f"another thread of this process held the writer lock {path} for {timeout}s")
    try:
        if held.depth == 0:
            held.fd = _acquire(path, deadline, timeout, poll)
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0 and held.fd is not None:
                fd, held.fd = held.fd, None
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
    finally:
        held.rlock.release()


def _acquire(path: Path, deadline: float, timeout: float, poll: float) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise WriterBusyError(
                        f"the lake writer lock {path} is held by another process "
                        f"({_holder(path)}) and was not released within {timeout}s; "
                        "only one writer may load the lake at a time"
                    ) from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} since={dt.datetime.now(dt.UTC).isoformat()}\n".encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown holder"
    except OSError:
        return "unknown holder"
