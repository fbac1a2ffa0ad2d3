"""The writer lock: one ``flock`` on ``<lake>/.writer.lock``, plus a Postgres advisory lock when the
catalog is shared.

Dagster's ``warehouse`` pool serializes writers inside one Dagster instance; this lock also covers
what the pool cannot see: a CLI writer, a second Dagster instance, a test process, and a step whose
run the pool already released (a worker still finishing after its run was marked failed). The
``flock`` spans the processes of one machine. With the DuckLake catalog in Postgres, writers on
several machines share the catalog database, so the lock is also a session-level advisory lock in
that database (``shared=<conninfo>``): the one thing every writer already reaches, and which cannot
be held by a writer that has lost the catalog it writes to.

Invariants:
- at most one process (on one machine, or on all machines sharing a Postgres catalog) holds the
  lock; inside a process it is re-entrant (a write helper called while the caller already holds it
  does not deadlock on itself), and threads queue on an RLock first;
- the kernel drops the flock, and Postgres the advisory lock (its session ends), when the holder
  dies, even by SIGKILL, so a crash never leaves a stale lock to clean up by hand;
- the lock file holds only the holder's pid and start time, never anything about the data; an
  error about the shared lock never shows the conninfo's password.
"""

import contextlib
import datetime as dt
import fcntl
import importlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from resources.warehouse.catalog import redact

# The advisory lock's key in the catalog database: one lake per database, so one constant ("redox-etl
# writer" folded into 63 bits). pg_locks shows it as classid = key >> 32, objid = key & 0xffffffff.
ADVISORY_KEY = 0x7265646F78_0001
# Asking Postgres twenty times a second per waiting writer is noise; five is prompt enough.
_SHARED_POLL_S = 0.2


class WriterBusyError(TimeoutError):
    """Another process held the lake's writer lock for longer than the timeout."""


class _Held:
    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.fd: int | None = None
        self.shared: Any = None  # the psycopg connection whose session holds the advisory lock
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
def writer_lock(
    path: Path, *, timeout: float, poll: float = 0.05, shared: str | None = None
) -> Iterator[None]:
    """Hold the exclusive writer lock at ``path`` (and, given the catalog's conninfo as ``shared``,
    its Postgres advisory lock), waiting up to ``timeout`` seconds in all for it."""
    path = path.resolve()
    held = _held_for(path)
    deadline = time.monotonic() + timeout
    if not held.rlock.acquire(timeout=max(timeout, 0.0)):
        raise WriterBusyError(f"another thread of this process held the writer lock {path} for {timeout}s")
    try:
        if held.depth == 0:
            held.fd = _acquire(path, deadline, timeout, poll)
            if shared is not None:
                try:
                    held.shared = _acquire_shared(shared, deadline, timeout)
                except BaseException:
                    _release_file(held)
                    raise
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0:
                _release_shared(held)
                _release_file(held)
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


def _release_file(held: _Held) -> None:
    if held.fd is not None:
        fd, held.fd = held.fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _release_shared(held: _Held) -> None:
    conn, held.shared = held.shared, None
    if conn is None:
        return
    # Closing the session releases the lock too; the explicit unlock only makes it prompt, so a
    # failure here (the server already gone) is not an error worth raising over a finished write.
    with contextlib.suppress(Exception):
        conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_KEY,))
    with contextlib.suppress(Exception):
        conn.close()


def _acquire_shared(conninfo: str, deadline: float, timeout: float) -> Any:
    """A psycopg connection whose session holds the lake's advisory lock, or WriterBusyError."""
    psycopg = _psycopg()
    failed: str | None = None
    try:
        # autocommit: the lock is session-level and no transaction should stay open beside it;
        # keepalives: a holder whose machine vanished is noticed by its own side within a minute.
        conn = psycopg.connect(
            conninfo,
            autocommit=True,
            application_name="redox-etl lake writer",
            connect_timeout=max(1, int(min(timeout, 30))),
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
    except psycopg.Error as exc:
        failed = redact(str(exc)).strip()
    if failed is not None:
        raise ConnectionError(
            f"the lake writer lock (a Postgres advisory lock in the catalog database "
            f"{redact(conninfo)}) could not be taken: Postgres said: {failed}. Check "
            "REDOX_LAKE_CATALOG and that the server is up."
        )
    try:
        while True:
            if conn.execute("SELECT pg_try_advisory_lock(%s)", (ADVISORY_KEY,)).fetchone()[0]:
                return conn
            if time.monotonic() >= deadline:
                raise WriterBusyError(
                    f"the lake writer lock (Postgres advisory lock {ADVISORY_KEY} in the catalog "
                    f"database) is held by {_shared_holder(conn)} and was not released within "
                    f"{timeout}s; only one writer may load the lake at a time, on any machine"
                )
            time.sleep(_SHARED_POLL_S)
    except BaseException:
        conn.close()
        raise


def _shared_holder(conn: Any) -> str:
    try:
        row = conn.execute(
            "SELECT a.pid, a.application_name, a.client_addr::text, a.backend_start"
            " FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s",
            (ADVISORY_KEY >> 32, ADVISORY_KEY & 0xFFFFFFFF),
        ).fetchone()
    except Exception:
        return "another session"
    if row is None:
        return "another session"
    pid, app, addr, since = row
    return f"backend pid {pid} ({app or 'unnamed'}) from {addr or 'a local socket'} since {since}"


def _psycopg() -> Any:
    try:
        return importlib.import_module("psycopg")
    except ImportError as exc:
        raise ImportError(
            "a Postgres lake catalog needs the 'psycopg' package for its writer lock: install the "
            "'postgres' extra (`uv sync --frozen --extra postgres`, or `pip install 'redox-etl[postgres]'`)"
        ) from exc


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown holder"
    except OSError:
        return "unknown holder"
