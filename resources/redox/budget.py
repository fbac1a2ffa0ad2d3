"""One rate budget per Redox host, shared by every process (and run) that talks to it.

Redox refuses an egress IP that sends more than its limit (7,500 requests) in any rolling window
(300 s). Dagster runs each step in its own process, so the count must live where all of them see
it: a SQLite file on one machine (pyrate-limiter's ``SQLiteBucket`` with its file lock), or Redis /
Postgres when the deployment spans machines (pyrate-limiter's ``RedisBucket`` / ``PostgresBucket``).

Invariants kept here:
- every HTTP attempt the client makes (token requests and retries included) first takes one slot;
- the window holds at most ``floor(limit * margin)`` slots, and a per-second rate just above the
  window's average density paces requests evenly instead of spending the window in a burst;
- a 429 (or ``Retry-After``) writes a penalty row into the same shared store: every process pauses
  until ``pause_until`` and then takes ``factor`` slots per request (so the whole budget runs at
  ``1/factor`` speed); the factor halves every tenth of a window without a 429 until it is 1 again.
  Weighted acquisition is pyrate-limiter's own mechanism; the penalty row is the small part it does
  not offer (its buckets have fixed rates);
- per-destination sub-limits are separate buckets acquired before the global one, so they can only
  make a request wait longer, never let it past the global budget;
- waiting happens on the budget's own event-loop thread (pyrate-limiter's async wait, which
  re-stamps each retry with the clock), so the caller's event loop never blocks or spins and a
  cancelled request gives its place back. Waiters in one process queue on that limiter's asyncio lock
  and only the first sleeps until the next slot frees, so hundreds of waiters (a client's whole
  in-flight bound) cost CPU per slot granted, not per waiter.
"""

import asyncio
import dataclasses
import importlib
import logging
import math
import re
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock
from pyrate_limiter import AbstractBucket, Limiter, Rate, SQLiteBucket, SQLiteQueries

from resources.redox.settings import BudgetBackend, RateSpec, RedoxSettings

log = logging.getLogger(__name__)

# Doubling per strike, capped: beyond 1/8 speed a 429 means something outside the budget (another
# client on the IP, a wrong REDOX_RATE_LIMIT), and slowing further would only stall the backfill.
MAX_SLOWDOWN = 8
# With no Retry-After we cannot know when the server's window frees; a short pause per strike lets the
# slowed budget probe again soon without hammering.
BASE_PAUSE_S = 1.0
MAX_PAUSE_S = 10.0
# pyrate-limiter sleeps this much past the computed wait. Its default (50 ms) would cap a 20/s
# pacing rate at 20/1.05 s, below the window's own average, so the window could never be spent.
LIMITER_BUFFER_MS = 10


def pacing_rates(rate: RateSpec, margin: float) -> list[Rate]:
    """The pyrate-limiter rates for one budget: the window at ``limit * margin`` plus a per-second rate.

    The per-second rate is the window's average density rounded up, so over a long run the window
    rate binds (the budget is spent fully) while no second carries more than its share.
    """
    window_ms = max(1, round(rate.seconds * 1000))
    window_limit = max(1, math.floor(rate.limit * margin))
    per_second = math.ceil(window_limit * 1000 / window_ms)
    if window_ms > 1000 and per_second < window_limit:
        return [Rate(per_second, 1000), Rate(window_limit, window_ms)]
    return [Rate(window_limit, window_ms)]


@dataclasses.dataclass(frozen=True)
class Penalty:
    """The shared slow-down after a 429. Times are epoch seconds, so every process agrees on them.

    After ``pause_until`` the budget runs at ``1/factor`` speed, and the factor halves every
    ``recovery_step(window)`` seconds without a new 429 until it is back to 1 at ``slow_until``.
    A 429 while still slowed doubles the factor (at most ``MAX_SLOWDOWN``).
    """

    pause_until: float = 0.0
    slow_until: float = 0.0
    factor: int = 1
    strikes: int = 0

    def weight(self, now: float, *, window_s: float) -> int:
        if now >= self.slow_until:
            return 1
        if now <= self.pause_until:
            return self.factor
        halvings = int((now - self.pause_until) / recovery_step(window_s))
        return max(1, self.factor >> halvings)

    def after_429(self, now: float, *, retry_after: float | None, window_s: float) -> "Penalty":
        current = self.weight(now, window_s=window_s)
        strikes = self.strikes + 1 if current > 1 else 1
        factor = min(MAX_SLOWDOWN, 2 * current)
        pause = retry_after if retry_after is not None else min(MAX_PAUSE_S, BASE_PAUSE_S * strikes)
        pause_until = max(self.pause_until, now + pause)
        # One halving step per doubling: from 8 back to 1 takes three steps.
        return Penalty(
            pause_until=pause_until,
            slow_until=pause_until + recovery_step(window_s) * math.log2(factor),
            factor=factor,
            strikes=strikes,
        )


def recovery_step(window_s: float) -> float:
    """A tenth of the window: 30 s at Redox's 300 s, so one stray 429 costs half speed for 30 s."""
    return window_s / 10


class PenaltyStore(Protocol):
    """Where the penalty lives: the same store as the bucket, so every process sees it."""

    def read(self, key: str) -> Penalty: ...

    def update(self, key: str, change: Callable[[Penalty], Penalty]) -> Penalty: ...

    def close(self) -> None: ...


class SQLitePenaltyStore:
    """A ``redox_budget_penalty`` table beside pyrate-limiter's bucket tables in the budget file."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS redox_budget_penalty (key TEXT PRIMARY KEY, pause_until REAL, "
            "slow_until REAL, factor INTEGER, strikes INTEGER)"
        )

    def read(self, key: str) -> Penalty:
        with self._lock:
            row = self._conn.execute(
                "SELECT pause_until, slow_until, factor, strikes FROM redox_budget_penalty WHERE key = ?",
                (key,),
            ).fetchone()
        return Penalty(*row) if row else Penalty()

    def update(self, key: str, change: Callable[[Penalty], Penalty]) -> Penalty:
        with self._lock:
            # IMMEDIATE takes the write lock before reading, so two processes' 429s compose.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    "SELECT pause_until, slow_until, factor, strikes FROM redox_budget_penalty WHERE key = ?",
                    (key,),
                ).fetchone()
                new = change(Penalty(*row) if row else Penalty())
                self._conn.execute(
                    "INSERT OR REPLACE INTO redox_budget_penalty VALUES (?, ?, ?, ?, ?)",
                    (key, new.pause_until, new.slow_until, new.factor, new.strikes),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return new

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class RedisPenaltyStore:
    """The penalty as a Redis hash, updated in a WATCH/MULTI transaction."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def _key(self, key: str) -> str:
        return f"redox-budget-penalty:{key}"

    def _parse(self, raw: dict[Any, Any]) -> Penalty:
        if not raw:
            return Penalty()
        get = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}
        return Penalty(get["pause_until"], get["slow_until"], int(get["factor"]), int(get["strikes"]))

    def read(self, key: str) -> Penalty:
        return self._parse(self._client.hgetall(self._key(key)))

    def update(self, key: str, change: Callable[[Penalty], Penalty]) -> Penalty:
        name = self._key(key)
        result: list[Penalty] = []

        def apply(pipe: Any) -> None:
            new = change(self._parse(pipe.hgetall(name)))
            pipe.multi()
            pipe.hset(name, mapping=dataclasses.asdict(new))
            pipe.expire(name, 24 * 3600)
            result[:] = [new]

        self._client.transaction(apply, name)
        return result[0]

    def close(self) -> None:
        self._client.close()


class PostgresPenaltyStore:
    """The penalty as a row locked ``FOR UPDATE`` in Postgres."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        with pool.connection() as conn:
            # Concurrent CREATE TABLE IF NOT EXISTS of one new table can fail in Postgres (both insert
            # its catalog row): processes starting together on a fresh database take turns here.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PENALTY_TABLE_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS redox_budget_penalty (key TEXT PRIMARY KEY, pause_until "
                "DOUBLE PRECISION, slow_until DOUBLE PRECISION, factor INTEGER, strikes INTEGER)"
            )

    def read(self, key: str) -> Penalty:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT pause_until, slow_until, factor, strikes FROM redox_budget_penalty WHERE key = %s",
                (key,),
            ).fetchone()
        return Penalty(*row) if row else Penalty()

    def update(self, key: str, change: Callable[[Penalty], Penalty]) -> Penalty:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO redox_budget_penalty VALUES (%s, 0, 0, 1, 0) ON CONFLICT (key) DO NOTHING",
                (key,),
            )
            row = conn.execute(
                "SELECT pause_until, slow_until, factor, strikes FROM redox_budget_penalty "
                "WHERE key = %s FOR UPDATE",
                (key,),
            ).fetchone()
            new = change(Penalty(*row))
            conn.execute(
                "UPDATE redox_budget_penalty SET pause_until = %s, slow_until = %s, factor = %s, "
                "strikes = %s WHERE key = %s",
                (new.pause_until, new.slow_until, new.factor, new.strikes, key),
            )
        return new

    def close(self) -> None:
        self._pool.close()


# Any fixed key works; CRC-32 of the table name is how pyrate-limiter keys its own table creation.
_PENALTY_TABLE_LOCK = zlib.crc32(b"redox_budget_penalty") & 0x7FFFFFFF


def _utc_session(conn: Any) -> None:
    """Every pooled Postgres session stamps in UTC.

    PostgresBucket stores slots as ``TIMESTAMP`` (no zone) converted in the session's TimeZone, so
    processes whose sessions default to different zones (server, role or PGTZ settings) would place
    each other's slots hours away, and a zone with daylight saving repeats an hour every autumn.
    """
    conn.execute("SET TIME ZONE 'UTC'")
    conn.commit()  # the pool wants the connection idle, and a committed SET lasts the session


def _client_module(name: str, extra: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"REDOX_BUDGET_BACKEND={extra} needs the {name!r} package: install the {extra!r} extra "
            f"(`uv sync --extra {extra}`, or `pip install 'redox-etl[{extra}]'`)"
        ) from exc


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _sqlite_bucket(path: Path, table: str, rates: list[Rate]) -> SQLiteBucket:
    """pyrate-limiter's SQLiteBucket under a cross-process file lock, as ``init_from_file`` builds it,
    except that the lock is polled every 2 ms instead of 50 ms: at tens of requests per second from
    several processes, a 50 ms poll makes the lock itself the bottleneck."""
    lock = FileLock(f"{path}.lock", poll_interval=0.002)
    conn = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False, timeout=30)
    with lock:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(SQLiteQueries.CREATE_BUCKET_TABLE.format(table=table))
        conn.execute(
            SQLiteQueries.CREATE_INDEX_ON_TIMESTAMP.format(index_name=f"idx_{table}_ts", table_name=table)
        )
        conn.commit()
    return SQLiteBucket(rates, conn, table, lock=lock)


class _Backend:
    """Makes pyrate-limiter buckets and the penalty store for one storage backend."""

    def __init__(self, backend: BudgetBackend, *, path: Path | None, url: str | None) -> None:
        self.backend = backend
        self.path = path
        self._client: Any = None
        if backend == "sqlite":
            if path is None:
                raise ValueError("the sqlite budget needs a path")
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.penalties: PenaltyStore = SQLitePenaltyStore(path)
        elif not url:
            raise ValueError(f"the {backend} budget needs REDOX_BUDGET_URL")
        elif backend == "redis":
            redis = _client_module("redis", "redis")
            self._client = redis.Redis.from_url(url)
            self.penalties = RedisPenaltyStore(self._client)
        else:
            _client_module("psycopg", "postgres")  # PostgresBucket imports it only later, mid-request
            pool = _client_module("psycopg_pool", "postgres")
            self._client = pool.ConnectionPool(url, open=True, configure=_utc_session)
            self.penalties = PostgresPenaltyStore(self._client)

    def bucket(self, name: str, rates: list[Rate]) -> AbstractBucket:
        if self.backend == "sqlite":
            assert self.path is not None
            return _sqlite_bucket(self.path, f"redox_budget_{_slug(name)}", rates)
        if self.backend == "redis":
            from pyrate_limiter import RedisBucket

            bucket: AbstractBucket = RedisBucket.init(rates, self._client, f"redox-budget:{name}")
            return bucket
        from pyrate_limiter import PostgresBucket

        return PostgresBucket(self._client, f"redox_budget_{_slug(name)}", rates)

    def close(self) -> None:
        self.penalties.close()


class RateBudget:
    """The shared budget for one Redox host; ``await budget.acquire()`` before every HTTP attempt."""

    def __init__(
        self,
        *,
        key: str,
        rate: RateSpec,
        margin: float = 0.97,
        sub_limits: dict[str, RateSpec] | None = None,
        backend: BudgetBackend = "sqlite",
        path: Path | None = None,
        url: str | None = None,
    ) -> None:
        self.key = key
        self.rate = rate
        self.margin = margin
        self._backend = _Backend(backend, path=path, url=url)
        self._rates = pacing_rates(rate, margin)
        self._max_weight = min(MAX_SLOWDOWN, min(r.limit for r in self._rates))
        self._global = Limiter(self._backend.bucket(key, self._rates), buffer_ms=LIMITER_BUFFER_MS)
        self._sub: dict[str, Limiter] = {}
        for destination, spec in (sub_limits or {}).items():
            self._sub[destination] = Limiter(
                self._backend.bucket(f"{key}/{destination}", pacing_rates(spec, margin)),
                buffer_ms=LIMITER_BUFFER_MS,
            )
        # All waiting happens on this budget's own event loop thread: pyrate-limiter's async wait
        # re-stamps an item with the clock on every retry (its blocking wait advances the stamp by the
        # planned sleep instead, which drifts under load), and the file lock and SQLite calls it makes
        # block only that thread, never the caller's loop.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="redox-budget", daemon=True)
        self._thread.start()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: RedoxSettings) -> "RateBudget":
        return cls(
            key=settings.host,
            rate=settings.rate_limit,
            margin=settings.rate_margin,
            sub_limits=settings.sub_limits,
            backend=settings.budget_backend,
            path=settings.budget_path,
            url=settings.budget_url.get_secret_value() if settings.budget_url else None,
        )

    @property
    def window_limit(self) -> int:
        """Slots per window after the margin: what the budget will actually spend."""
        return self._rates[-1].limit

    async def acquire(self, destination: str | None = None) -> float:
        """Wait for a slot (and the destination's, if it has a sub-limit); returns seconds waited.

        Cancelling the caller cancels the wait, so an abandoned request spends no slot.
        """
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(self._take(destination), self._loop)
        )

    def acquire_blocking(self, destination: str | None = None) -> float:
        """The synchronous form of ``acquire``, for threads and plain scripts."""
        return asyncio.run_coroutine_threadsafe(self._take(destination), self._loop).result()

    async def _take(self, destination: str | None) -> float:
        started = time.monotonic()
        penalty = self._backend.penalties.read(self.key)
        now = time.time()
        if penalty.pause_until > now:
            await asyncio.sleep(penalty.pause_until - now)
            now = time.time()
        weight = min(self._max_weight, penalty.weight(now, window_s=self.rate.seconds))
        chain = []
        if destination is not None and destination in self._sub:
            chain.append((self._sub[destination], f"{self.key}/{destination}"))
        chain.append((self._global, self.key))
        for limiter, name in chain:
            if not await limiter.try_acquire_async(name, weight=weight):
                # A blocking acquire only refuses a weight that can never fit the rate.
                raise RuntimeError(f"rate budget {name} cannot admit weight {weight}")
        return time.monotonic() - started

    async def slow_down(self, *, retry_after: float | None = None) -> Penalty:
        """Record a 429 for every process: pause, then run at a fraction of the rate for a window."""
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(self._slow_down(retry_after), self._loop)
        )

    def slow_down_blocking(self, retry_after: float | None = None) -> Penalty:
        return asyncio.run_coroutine_threadsafe(self._slow_down(retry_after), self._loop).result()

    async def _slow_down(self, retry_after: float | None) -> Penalty:
        now = time.time()
        penalty = self._backend.penalties.update(
            self.key, lambda p: p.after_429(now, retry_after=retry_after, window_s=self.rate.seconds)
        )
        log.warning(
            "Redox answered 429 for %s: the shared budget pauses %.1fs, then runs at 1/%d speed, "
            "recovering fully by %s",
            self.key,
            max(0.0, penalty.pause_until - now),
            penalty.factor,
            time.strftime("%H:%M:%S", time.localtime(penalty.slow_until)),
        )
        return penalty

    def penalty(self) -> Penalty:
        return self._backend.penalties.read(self.key)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def cancel_waiters() -> None:
            current = asyncio.current_task()
            waiting = [t for t in asyncio.all_tasks() if t is not current]
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_waiters(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        for limiter in (self._global, *self._sub.values()):
            limiter.close()
        self._backend.close()

    def __enter__(self) -> "RateBudget":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
