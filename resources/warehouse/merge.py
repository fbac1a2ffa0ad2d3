"""Loading one partition of one surface into a clinical table: the newest version of each record wins.

Invariants:
- which version wins is ``schema.versions``'s rule, applied twice: within the incoming frame
  (polars) and against the stored row (the MERGE's SQL), both rendered from that one definition;
- a load (rows, the partition's quarantine share, its ``partition_loads`` row) is ONE transaction,
  so every snapshot has loaded + quarantined = fetched for the partition;
- only the natural key and ``source_updated_at`` are read; every other column passes through untouched,
  except on a table with component rows (``results.parent_source_id``): a component row is part of
  its record's version, so it follows its parent there. A component whose parent in the lake is
  newer is ignored as older, and when a record's version wins, its stored component rows that the
  winning version no longer has are deleted in the same transaction (``components_removed``): the
  lake never holds a current record beside components of an earlier version.
"""

import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Final

import duckdb
import polars as pl

from resources.warehouse.checks import check_constant, check_frame, check_quarantine
from resources.warehouse.connection import LAKE
from resources.warehouse.ddl import quote_ident
from resources.warehouse.migrate import lake_schemas
from resources.warehouse.transaction import Writer, current_snapshot, registered, transaction, utcnow
from schema import NATURAL_KEY, PARTITION_LOADS, UNIFIED_TABLES, UTC_TS, versions

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class MergeStats:
    """What one ``merge`` did: ``total`` (rows in) = inserted + updated + ignored_older + duplicates."""

    table: str
    source_surface: str
    partition_day: dt.date
    run_id: str
    total: int
    inserted: int
    updated: int
    ignored_older: int
    duplicates: int
    quarantined: int | None  # None: the partition's quarantine was not replaced by this merge
    snapshot_id: int | None
    # Stored component rows of a record whose winning version has fewer components (results only).
    components_removed: int = 0

    def as_metadata(self) -> dict[str, int]:
        """Counts only, safe for Dagster metadata and logs."""
        counts = {
            "rows": self.total,
            "inserted": self.inserted,
            "updated": self.updated,
            "ignored_older": self.ignored_older,
            "duplicates": self.duplicates,
        }
        if self.components_removed:
            counts["components_removed"] = self.components_removed
        if self.quarantined is not None:
            counts["quarantined"] = self.quarantined
        return counts


def merge(
    writer: Writer,
    table: str,
    frame: pl.DataFrame,
    *,
    partition_day: dt.date,
    run_id: str,
    source_surface: str,
    quarantine: pl.DataFrame | None = None,
) -> MergeStats:
    """Upsert one partition of one surface into a clinical table (see ``Warehouse.merge``)."""
    if table not in UNIFIED_TABLES:
        raise ValueError(f"merge() loads clinical tables {sorted(UNIFIED_TABLES)}, not {table!r}")
    # ``source_ref`` (schema.SOURCE_REF) may ride along, rows without one get null; so may a per-row
    # ``partition_day`` (captured files: each record's clinical day), else every row gets the argument.
    check_frame(table, frame.drop("source_ref", "partition_day", strict=False), UNIFIED_TABLES[table])
    if "source_ref" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, pl.String()).alias("source_ref"))
    check_constant(frame, "source_surface", source_surface, table)
    if quarantine is not None:
        check_quarantine(quarantine, entity=table, source_surface=source_surface)
    latest = newest_per_key(frame)
    now = utcnow()
    staged = _with_lineage(latest, partition_day, run_id, now)
    columns = list(lake_schemas()[table])
    target = f"{LAKE}.main.{quote_ident(table)}"
    on = " AND ".join(f"t.{quote_ident(k)} = s.{quote_ident(k)}" for k in NATURAL_KEY)
    older = versions.sql_strictly_older("s", "t")
    key_cols = ", ".join(quote_ident(k) for k in NATURAL_KEY)
    version_cols = ", ".join(quote_ident(c) for c in versions.VERSION_COLUMNS)
    has_parts = PARENT in UNIFIED_TABLES[table]
    # What the MERGE reads: the incoming rows, less (on a table with parts) the components of a
    # version the lake already holds a newer one of.
    source = _kept_parts_sql(target) if has_parts else "_incoming"
    count_sql = (
        "SELECT count(*) FILTER (WHERE t._hit IS NULL),"
        f" count(*) FILTER (WHERE t._hit AND NOT {older}),"
        f" count(*) FILTER (WHERE t._hit AND {older})"
        f" FROM {source} AS s LEFT JOIN"
        f" (SELECT {key_cols}, {version_cols}, true AS _hit FROM {target}) AS t ON {on}"
    )
    merge_sql = (
        f"MERGE INTO {target} AS t USING {source} AS s ON ({on})"
        f" WHEN MATCHED AND NOT {older} THEN UPDATE SET "
        + ", ".join(f"{quote_ident(c)} = s.{quote_ident(c)}" for c in columns)
        + f" WHEN NOT MATCHED THEN INSERT ({', '.join(quote_ident(c) for c in columns)})"
        f" VALUES ({', '.join('s.' + quote_ident(c) for c in columns)})"
    )
    message = f"merge {table} {source_surface} {partition_day.isoformat()}"
    staged_quarantine = (
        _with_lineage(quarantine, partition_day, run_id, now) if quarantine is not None else None
    )
    with (
        writer() as con,
        registered(con, "_incoming", staged),
        registered(con, "_quarantine", staged_quarantine),
    ):
        with transaction(con, message=message, extra={"run_id": run_id}):
            counts = con.execute(count_sql).fetchone()
            assert counts is not None
            inserted, updated, ignored = (int(n) for n in counts)
            # Components left out of the MERGE (their record's stored version is newer) are older.
            ignored += latest.height - inserted - updated - ignored
            affected = _rowcount(con.execute(merge_sql))
            if affected != inserted + updated:
                # Only possible if the table already holds a key twice; loading on would hide it.
                raise RuntimeError(
                    f"merge into {table} touched {affected} rows, expected {inserted + updated}: "
                    "the table holds duplicate natural keys; run the key-uniqueness check"
                )
            stats = MergeStats(
                table=table,
                source_surface=source_surface,
                partition_day=partition_day,
                run_id=run_id,
                total=frame.height,
                inserted=inserted,
                updated=updated,
                ignored_older=ignored,
                duplicates=frame.height - latest.height,
                quarantined=None if staged_quarantine is None else staged_quarantine.height,
                snapshot_id=None,
                components_removed=_remove_stale_parts(con, target) if has_parts else 0,
            )
            if staged_quarantine is not None:
                _replace_quarantine_rows(
                    con, "_quarantine", staged_quarantine.columns, table, source_surface, partition_day
                )
            record_load(con, stats, now)
        stats = dataclasses.replace(stats, snapshot_id=current_snapshot(con))
    log.info(
        "merged %s/%s day=%s: rows=%d inserted=%d updated=%d ignored_older=%d duplicates=%d "
        "components_removed=%d quarantined=%s snapshot=%s",
        table,
        source_surface,
        partition_day,
        stats.total,
        stats.inserted,
        stats.updated,
        stats.ignored_older,
        stats.duplicates,
        stats.components_removed,
        stats.quarantined,
        stats.snapshot_id,
    )
    return stats


# The column that makes a row a part (a component) of another record of its table.
PARENT: Final = "parent_source_id"


def _kept_parts_sql(target: str) -> str:
    """``_incoming`` without the component rows whose record the lake holds in a newer version: a
    component's version is its record's, so it loses exactly when its record would."""
    parent = quote_ident(PARENT)
    older = versions.sql_strictly_older("s", "p")
    return (
        f"(SELECT s.* FROM _incoming AS s WHERE s.{parent} IS NULL OR NOT EXISTS ("
        f"SELECT 1 FROM {target} AS p WHERE p.source_surface = s.source_surface"
        f" AND p.source_id = s.{parent} AND p.{parent} IS NULL AND {older}))"
    )


def _remove_stale_parts(con: duckdb.DuckDBPyConnection, target: str) -> int:
    """After the MERGE: delete the stored component rows of each incoming record whose version is
    now the lake's (it won, or tied) that the incoming rows do not hold, i.e. the components an
    earlier version had beyond the winning one's. A record whose stored version stayed (newer than
    the incoming one) keeps its components."""
    parent = quote_ident(PARENT)
    won = versions.sql_strictly_older("s", "p")
    return _rowcount(
        con.execute(
            f"DELETE FROM {target} AS t WHERE t.{parent} IS NOT NULL"
            f" AND EXISTS (SELECT 1 FROM _incoming AS s JOIN {target} AS p"
            f" ON p.source_surface = s.source_surface AND p.source_id = s.source_id AND p.{parent} IS NULL"
            f" WHERE s.{parent} IS NULL AND s.source_surface = t.source_surface"
            f" AND s.source_id = t.{parent} AND NOT {won})"
            f" AND NOT EXISTS (SELECT 1 FROM _incoming AS s"
            f" WHERE s.source_surface = t.source_surface AND s.source_id = t.source_id)"
        )
    )


def newest_per_key(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per natural key, chosen by ``schema.versions`` (ties: the later row); order kept."""
    keys = list(NATURAL_KEY)
    if frame.select(pl.struct(keys).n_unique()).item() == frame.height:
        return frame
    newest = versions.polars_sort(arrival="_order")
    return (
        frame.with_row_index("_order")
        .sort(newest.by, descending=newest.descending, nulls_last=newest.nulls_last)
        .unique(subset=keys, keep="first", maintain_order=True)
        .sort("_order")
        .drop("_order")
    )


def record_load(con: duckdb.DuckDBPyConnection, stats: MergeStats, now: dt.datetime) -> None:
    """The ``partition_loads`` row of this load, written inside its transaction."""
    con.execute(
        f"INSERT INTO {LAKE}.main.partition_loads ({', '.join(quote_ident(c) for c in PARTITION_LOADS)})"
        f" VALUES ({', '.join('?' * len(PARTITION_LOADS))})",
        [
            stats.table,
            stats.source_surface,
            stats.partition_day,
            stats.run_id,
            stats.total,
            stats.inserted,
            stats.updated,
            stats.ignored_older,
            stats.duplicates,
            now,
            stats.quarantined,
        ],
    )


def _with_lineage(frame: pl.DataFrame, partition_day: dt.date, run_id: str, now: dt.datetime) -> pl.DataFrame:
    day = pl.col("partition_day") if "partition_day" in frame.columns else pl.lit(partition_day, pl.Date())
    return frame.with_columns(
        day.alias("partition_day"),
        pl.lit(run_id, pl.String()).alias("run_id"),
        pl.lit(now, UTC_TS).alias("ingested_at"),
    )


def _replace_quarantine_rows(
    con: duckdb.DuckDBPyConnection,
    source: str,
    columns: Sequence[str],
    entity: str,
    source_surface: str,
    partition_day: dt.date,
) -> None:
    """A rerun replaces the partition's quarantine share, so it never duplicates, and empties it
    when nothing is quarantined anymore (a mapping was fixed)."""
    con.execute(
        f"DELETE FROM {LAKE}.main.quarantine WHERE entity = ? AND source_surface = ? AND partition_day = ?",
        [entity, source_surface, partition_day],
    )
    names = ", ".join(quote_ident(c) for c in columns)
    con.execute(f"INSERT INTO {LAKE}.main.quarantine ({names}) SELECT {names} FROM {source}")


def _rowcount(result: duckdb.DuckDBPyConnection) -> int:
    row = result.fetchone()
    return int(row[0]) if row else 0
