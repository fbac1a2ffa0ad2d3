"""The shared rate budget: pacing, sharing through one SQLite file, and the adaptive penalty.

That handles on one store never crowd a window is held for every backend, SQLite included, in
tests/integration/test_budget_backends.py."""

import asyncio
import sqlite3
import time

import pytest

from resources.redox.budget import MAX_SLOWDOWN, Penalty, RateBudget, pacing_rates
from resources.redox.settings import RateSpec


def test_pacing_rates_spread_the_window():
    window, per_second = pacing_rates(RateSpec(limit=7500, seconds=300), 0.97)[::-1]
    assert (window.limit, window.interval) == (7275, 300_000)
    assert (per_second.limit, per_second.interval) == (25, 1000)
    rates = pacing_rates(RateSpec(limit=300, seconds=20), 0.97)
    assert [(r.limit, r.interval) for r in rates] == [(15, 1000), (291, 20_000)]
    # A window of a second or less is its own pacing.
    assert [(r.limit, r.interval) for r in pacing_rates(RateSpec(limit=5, seconds=1), 1.0)] == [(5, 1000)]


def test_penalty_escalates_and_recovers():
    window = 20.0  # recovery step: 2 s
    p = Penalty().after_429(1000.0, retry_after=None, window_s=window)
    assert (p.factor, p.strikes, p.pause_until) == (2, 1, 1001.0)
    assert p.weight(1001.5, window_s=window) == 2
    assert p.weight(1003.5, window_s=window) == 1 and p.slow_until == 1003.0
    # A 429 while slowed doubles the factor, up to the cap.
    p2 = p.after_429(1002.0, retry_after=None, window_s=window)
    assert (p2.factor, p2.strikes, p2.pause_until) == (4, 2, 1004.0)
    p3 = p2
    for i in range(5):
        p3 = p3.after_429(1004.0 + i, retry_after=None, window_s=window)
    assert p3.factor == MAX_SLOWDOWN
    # Recovery halves the factor each step after the pause: 8, 4, 2, 1.
    steps = [p3.weight(p3.pause_until + 0.1 + 2 * k, window_s=window) for k in range(4)]
    assert steps == [8, 4, 2, 1]
    # Retry-After, when the server sends one, sets the pause.
    assert Penalty().after_429(1000.0, retry_after=7.0, window_s=window).pause_until == 1007.0
    # A 429 after full recovery starts over.
    fresh = p3.after_429(p3.slow_until + 1, retry_after=None, window_s=window)
    assert (fresh.strikes, fresh.factor) == (1, 2)


def _budget(tmp_path, **kw) -> RateBudget:
    return RateBudget(key="redox.test", path=tmp_path / "budget.sqlite", **kw)


async def test_async_acquire_does_not_block_the_loop(tmp_path):
    budget = _budget(tmp_path, rate=RateSpec(limit=4, seconds=2), margin=1.0)
    ticks = 0
    stop = False

    async def ticker():
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    try:
        waited = [await budget.acquire() for _ in range(6)]
        assert sum(waited) >= 1.5
        assert ticks > 50  # the loop kept running while the budget waited
    finally:
        stop = True
        await task
        budget.close()


def test_penalty_is_shared_and_weighs_requests(tmp_path):
    a = _budget(tmp_path, rate=RateSpec(limit=40, seconds=4), margin=1.0)
    b = _budget(tmp_path, rate=RateSpec(limit=40, seconds=4), margin=1.0)
    try:
        penalty = a.slow_down_blocking(retry_after=0.3)
        assert b.penalty() == penalty and penalty.factor == 2
        started = time.monotonic()
        b.acquire_blocking()
        assert time.monotonic() - started >= 0.25  # b paused until a's pause ended
        # Each request now takes two slots: 10 per second becomes 5.
        started = time.monotonic()
        for _ in range(10):
            b.acquire_blocking()
        assert time.monotonic() - started >= 1.0
    finally:
        a.close()
        b.close()


def test_sub_limit_is_stricter_than_global(tmp_path):
    budget = _budget(
        tmp_path,
        rate=RateSpec(limit=100, seconds=2),
        margin=1.0,
        sub_limits={"results": RateSpec(limit=3, seconds=1)},
    )
    try:
        started = time.monotonic()
        for _ in range(6):
            budget.acquire_blocking("results")
        assert time.monotonic() - started >= 1.0
        started = time.monotonic()
        for _ in range(6):
            budget.acquire_blocking("fhir")  # no sub-limit: only the global rate applies
        assert time.monotonic() - started < 1.0
    finally:
        budget.close()


async def test_a_cancelled_wait_spends_no_slot(tmp_path):
    budget = _budget(tmp_path, rate=RateSpec(limit=2, seconds=2), margin=1.0)  # one per second
    try:
        await budget.acquire()
        waiter = asyncio.create_task(budget.acquire())
        await asyncio.sleep(0.2)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(1.2)  # past the moment the cancelled wait would have been admitted
        with sqlite3.connect(tmp_path / "budget.sqlite") as db:
            assert db.execute("SELECT count(*) FROM redox_budget_redox_test").fetchone()[0] == 1
    finally:
        budget.close()
