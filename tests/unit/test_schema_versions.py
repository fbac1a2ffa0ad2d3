"""schema.versions: the polars and SQL renderings of the "newest version per key" rule agree."""

import datetime as dt
import itertools

import duckdb
import polars as pl

from schema import versions

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
STAMPS = [None, T0, T0 + dt.timedelta(hours=1)]


def test_polars_puts_the_newest_first_then_the_later_arrival_and_a_missing_timestamp_last() -> None:
    frame = pl.DataFrame(
        {"source_updated_at": [T0, None, T0 + dt.timedelta(hours=1), T0], "_seq": [0, 1, 2, 3]}
    )
    newest = versions.polars_sort(arrival="_seq")
    ordered = frame.sort(newest.by, descending=newest.descending, nulls_last=newest.nulls_last)
    assert ordered["_seq"].to_list() == [2, 3, 0, 1]


def test_sql_calls_an_arrival_older_only_when_polars_ranks_it_strictly_below_on_known_values() -> None:
    older = versions.sql_strictly_older("s", "t")
    con = duckdb.connect()
    for new, old in itertools.product(STAMPS, STAMPS):
        got = con.execute(
            f"SELECT {older} FROM (SELECT ?::TIMESTAMPTZ AS source_updated_at) s,"
            " (SELECT ?::TIMESTAMPTZ AS source_updated_at) t",
            [new, old],
        ).fetchone()
        assert got == ((new is not None and old is not None and new < old),), (new, old)


def test_extra_ranking_columns_are_compared_like_the_timestamp_and_before_it() -> None:
    order = versions.newest_first(("_rank", "source_updated_at"))
    assert order == (("_rank", "desc", "nulls_last"), *versions.NEWEST_FIRST)
    older = versions.sql_strictly_older("s", "t", order)
    con = duckdb.connect()
    row = con.execute(
        f"SELECT {older} FROM (SELECT 1 AS _rank, ?::TIMESTAMPTZ AS source_updated_at) s,"
        " (SELECT 2 AS _rank, ?::TIMESTAMPTZ AS source_updated_at) t",
        [T0 + dt.timedelta(hours=1), T0],
    ).fetchone()
    assert row == (True,)  # a lower rank loses even with a newer timestamp
