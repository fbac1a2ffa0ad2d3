"""Sync state: each stream's watermark (``sync_state``) and the queue of partitions to reload
(``pending_partitions``).

Invariant: a watermark moves only in the same transaction that queues the partitions its changes
touched, so a change seen is never forgotten and never looked for twice; a queued partition is
forgotten only by the load that covered it (queued before that load started). Watermarks are
timezone-aware and stored in UTC.
"""

import datetime as dt
from collections.abc import Sequence

import duckdb
import polars as pl

from resources.warehouse.connection import LAKE
from resources.warehouse.ddl import quote_ident
from resources.warehouse.transaction import Writer, insert_all, registered, table_exists, transaction, utcnow
from schema import SYNC_STATE, UTC_TS


def read_watermark(con: duckdb.DuckDBPyConnection, stream: str) -> dt.datetime | None:
    """The stored watermark of ``stream`` (UTC), or None if it has never been set."""
    if not table_exists(con, "sync_state"):
        return None
    row = con.execute(f"SELECT watermark FROM {LAKE}.main.sync_state WHERE stream = ?", [stream]).fetchone()
    if row is None or row[0] is None:
        return None
    value: dt.datetime = row[0]
    return value.astimezone(dt.UTC)


def queue_changes(
    writer: Writer, stream: str, watermark: dt.datetime, pending: pl.DataFrame, *, run_id: str
) -> int:
    """Move ``stream``'s watermark and queue ``pending``'s (table_name, partition_day) pairs, together."""
    if watermark.tzinfo is None:
        raise ValueError("a watermark must be timezone-aware (UTC); got a naive datetime")
    now = utcnow()
    staged = (
        pending.select("table_name", "partition_day")
        .unique()
        .with_columns(
            pl.lit(now, dtype=pl.Datetime("us", "UTC")).alias("queued_at"), pl.lit(run_id).alias("run_id")
        )
    )
    columns = ", ".join(quote_ident(c) for c in SYNC_STATE)
    with (
        writer() as con,
        registered(con, "_incoming", staged),
        transaction(con, message=f"changes {stream}", extra={"run_id": run_id}),
    ):
        insert_all(con, "pending_partitions", staged.columns)
        con.execute(f"DELETE FROM {LAKE}.main.sync_state WHERE stream = ?", [stream])
        con.execute(
            f"INSERT INTO {LAKE}.main.sync_state ({columns}) VALUES (?, ?, ?, ?)",
            [stream, watermark.astimezone(dt.UTC), now, run_id],
        )
    return staged.height


def read_pending(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """Queued (table_name, partition_day) pairs, each with the earliest time it was queued."""
    if not table_exists(con, "pending_partitions"):  # a lake from before the queue existed
        return pl.DataFrame(
            schema={"table_name": pl.String(), "partition_day": pl.Date(), "queued_at": UTC_TS}
        )
    return con.execute(
        f"SELECT table_name, partition_day, min(queued_at) AS queued_at FROM {LAKE}.main.pending_partitions"
        " GROUP BY ALL ORDER BY partition_day, table_name"
    ).pl()


def clear_pending(
    writer: Writer, table: str, days: Sequence[dt.date], *, loaded_since: dt.datetime, run_id: str
) -> None:
    """Forget ``table``'s queued partitions on ``days`` queued before ``loaded_since``."""
    with (
        writer() as con,
        transaction(con, message=f"clear pending {table}", extra={"run_id": run_id}),
    ):
        con.execute(
            f"DELETE FROM {LAKE}.main.pending_partitions WHERE table_name = ?"
            " AND partition_day IN (SELECT unnest(?::DATE[])) AND queued_at < ?",
            [table, list(days), loaded_since],
        )
