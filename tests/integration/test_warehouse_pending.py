"""The queue of changed partitions: queued with the watermark in one transaction, cleared by loads."""

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from assets.partitions import ranges
from resources.warehouse import Warehouse

D1, D2, D5 = dt.date(2026, 3, 1), dt.date(2026, 3, 2), dt.date(2026, 3, 5)


@pytest.fixture
def wh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Warehouse:
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path / "home"))
    warehouse = Warehouse(lake_dir=str(tmp_path / "lake"))
    warehouse.ensure_tables()
    return warehouse


def _pending(*pairs: tuple[str, dt.date]) -> pl.DataFrame:
    return pl.DataFrame(
        {"table_name": [t for t, _ in pairs], "partition_day": [d for _, d in pairs]},
        schema={"table_name": pl.String(), "partition_day": pl.Date()},
    )


def test_queue_moves_the_watermark_and_loads_clear_only_what_they_covered(wh: Warehouse) -> None:
    mark = dt.datetime(2026, 3, 6, 12, tzinfo=dt.UTC)
    queued = wh.queue_changes(
        "changes", mark, _pending(("results", D1), ("results", D1), ("encounters", D5)), run_id="r1"
    )
    assert queued == 2  # the same (table, day) twice is one entry
    assert wh.get_watermark("changes") == mark
    assert wh.pending_partitions().select("table_name", "partition_day").rows() == [
        ("results", D1),
        ("encounters", D5),
    ]

    # A load that began before the queue entry does not clear it: it read older pages.
    wh.clear_pending("results", [D1], loaded_since=dt.datetime(2000, 1, 1, tzinfo=dt.UTC), run_id="r2")
    assert wh.pending_partitions().height == 2
    # Another table's load or another day leaves it too.
    wh.clear_pending("encounters", [D1], loaded_since=dt.datetime.now(dt.UTC), run_id="r3")
    assert wh.pending_partitions().height == 2
    wh.clear_pending("results", [D1, D2], loaded_since=dt.datetime.now(dt.UTC), run_id="r4")
    assert wh.pending_partitions().select("table_name").to_series().to_list() == ["encounters"]


def test_an_empty_queue_still_moves_the_watermark(wh: Warehouse) -> None:
    mark = dt.datetime(2026, 3, 6, tzinfo=dt.UTC)
    assert wh.queue_changes("changes", mark, _pending(), run_id="r") == 0
    assert wh.get_watermark("changes") == mark
    with pytest.raises(ValueError, match="timezone-aware"):
        wh.queue_changes("changes", dt.datetime(2026, 3, 7), _pending(), run_id="r")


def test_ranges_groups_consecutive_days() -> None:
    assert ranges([]) == []
    assert ranges([D5, D1, D2, D1]) == [(D1, D2), (D5, D5)]
