"""The sandbox never stamps a record in the future (issue 13, item 4).

A world whose range reaches today once started its clock at the coming UTC midnight, so every
record written "now" carried a ``lastUpdated`` hours ahead of the wall clock and the lake's
``timestamps_utc`` check failed on all four tables right after ``make demo``. The clock now starts
at the midnight after ``end`` or at the build time, whichever is earlier, and the truth shows the
stamps the store serves.
"""

from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from sandbox.population import PopulationConfig, build

KINDS = ("patients", "encounters", "results", "appointments")


def _newest_stamp(truth: dict[str, pl.DataFrame]) -> datetime:
    return max(truth[kind]["last_updated"].max() for kind in KINDS)  # type: ignore[type-var]


def test_a_world_reaching_today_holds_nothing_stamped_after_now() -> None:
    world = build(PopulationConfig(seed=5, patients=200))
    after = datetime.now(UTC)
    assert world.clock0 <= after
    assert world.clock0.date() == after.date() or after - world.clock0 < timedelta(minutes=5)
    truth = world.truth()
    newest = _newest_stamp(truth)
    assert newest <= world.clock0 <= after
    # Not vacuous: the world was written right up to its clock's day.
    assert newest > world.clock0 - timedelta(days=2)


def test_the_clock_stops_at_the_given_now_and_nothing_happens_after_it() -> None:
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    config = PopulationConfig(seed=5, patients=200, start=date(2026, 2, 1), end=date(2026, 3, 10), clock=now)
    world = build(config)
    assert world.clock == world.clock0 == now
    truth = world.truth()
    assert _newest_stamp(truth) <= now
    # Visits and results are things that happened: none starts after the clock.
    assert truth["encounters"]["start_at"].max() <= now  # type: ignore[operator]
    assert truth["results"]["effective_at"].max() <= now  # type: ignore[operator]
    # Same resolved config, same world, stamp for stamp.
    again = build(config).truth()
    for kind in KINDS:
        assert again[kind].equals(truth[kind]), kind
    # The store serves what the truth says.
    for kind in ("encounters", "results"):
        row = truth[kind].row(0, named=True)
        stored = world.store.current(kind, row["source_surface"], row["source_id"])
        assert stored is not None and stored.last_updated == row["last_updated"]


def test_a_past_range_still_ends_at_the_midnight_after_it() -> None:
    config = PopulationConfig(seed=5, patients=20, start=date(2025, 1, 1), end=date(2025, 1, 10)).resolved()
    assert config.clock == datetime(2025, 1, 11, tzinfo=UTC)


def test_a_range_starting_after_today_is_refused() -> None:
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    with pytest.raises(ValueError, match="after today"):
        PopulationConfig(start=tomorrow, end=tomorrow + timedelta(days=3)).resolved()
    with pytest.raises(ValueError, match="timezone-aware"):
        PopulationConfig(clock=datetime(2026, 1, 1)).resolved()
