"""The Warehouse resource: a DuckLake lake attached to DuckDB, one writer at a time, readers any time.

Invariants:
- every write runs under the cross-process writer lock; each load (merge, quarantine replacement,
  api_calls, watermark, derived table) is ONE DuckDB transaction, i.e. one DuckLake snapshot, so a
  reader sees all of a partition's load or none of it and a crash mid-write leaves nothing partial
  visible (maintenance is a sequence of DuckLake calls, each atomic, none changing table contents);
- readers attach the lake READ_ONLY and read one DuckLake snapshot per transaction, so they never
  block the writer and are never blocked by it (SQLite catalog in WAL mode with a busy timeout;
  docs/operations.md "Warehouse" says why);
- every connection's session TimeZone is UTC, so TIMESTAMPTZ values display and cast in UTC;
- the resource reads no clinical column but the natural key and ``source_updated_at`` that the schema
  module names; everything else passes through untouched;
- nothing about a row's contents is logged or put in an exception: table names, counts, snapshot ids.
"""

import collections
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
from dagster import ConfigurableResource
from pydantic import Field

from resources import settings
from resources.warehouse.catalog import CatalogSpec, parse_catalog, redact
from resources.warehouse.ddl import columns_sql, duckdb_type, normalize_type, quote_ident
from resources.warehouse.extensions import load_extensions, storage_extensions
from resources.warehouse.lock import held_by_this_process, writer_lock
from schema import (
    API_CALLS,
    API_CALLS_LINEAGE,
    LINEAGE,
    NATURAL_KEY,
    PARTITION_LOADS,
    QUARANTINE,
    SYNC_STATE,
    TABLES,
    UTC_TS,
    WAREHOUSE_TABLES,
)
from schema import UNIFIED_TABLES as CLINICAL

log = logging.getLogger(__name__)

LAKE = "lake"  # the alias every connection attaches the lake under; SQL in docs and views uses it
COMMIT_AUTHOR = "redox-etl"
LOCK_FILE = ".writer.lock"

# Bookkeeping tables hold a row or two per write. Inlining them into the catalog spares a tiny Parquet
# file (plus a delete file) per watermark update. Tables with patient data are never inlined: their
# rows stay in Parquet under the data path. The catalog still holds PHI-derived values, though:
# DuckLake keeps each data file's per-column min/max statistics there (ducklake_file_column_stats),
# e.g. the smallest and largest family name in a file. So the catalog is protected as the data is
# (owner-only file; for Postgres, the same access rules as the lake), see docs/operations.md.
_INLINED_TABLES = {"sync_state": 1000, "partition_loads": 1000, "pending_partitions": 1000}


class LakeNotFoundError(FileNotFoundError):
    """A reader asked for a lake that has never been written."""


class SchemaMismatchError(RuntimeError):
    """A lake table's column has a different type than schema/__init__.py declares."""


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

    def as_metadata(self) -> dict[str, int]:
        """Counts only, safe for Dagster metadata and logs."""
        counts = {
            "rows": self.total,
            "inserted": self.inserted,
            "updated": self.updated,
            "ignored_older": self.ignored_older,
            "duplicates": self.duplicates,
        }
        if self.quarantined is not None:
            counts["quarantined"] = self.quarantined
        return counts


@dataclasses.dataclass(frozen=True, slots=True)
class MaintenanceReport:
    files_merged: int
    snapshots_expired: int
    files_deleted: int
    orphans_deleted: int
    snapshot_id: int | None


def lake_schemas() -> dict[str, dict[str, pl.DataType]]:
    """Every lake table and its columns in order: schema.TABLES plus load lineage, plus bookkeeping."""
    out: dict[str, dict[str, pl.DataType]] = {}
    for name, schema in TABLES.items():
        columns: dict[str, pl.DataType] = dict(schema)
        if name in CLINICAL or name == "quarantine":
            columns.update(LINEAGE)
        elif name == "api_calls":
            columns.update(API_CALLS_LINEAGE)
        out[name] = columns
    for name, schema in WAREHOUSE_TABLES.items():
        out[name] = dict(schema)
    return out


class Warehouse(ConfigurableResource):
    """The DuckLake warehouse: Parquet data files under a SQLite (default) or Postgres catalog.

    Writes go through the methods here (one writer, one transaction each); reads through
    ``connect()`` / ``query()`` (read-only attach, never blocked).
    """

    lake_dir: str | None = Field(
        default=None, description="Lake folder (catalog, data, writer lock). Default: settings.lake_dir()."
    )
    catalog: str | None = Field(
        default=None,
        description="'sqlite' (default, <lake>/catalog.sqlite), 'sqlite:<path>' or "
        "'postgres:<libpq conninfo>'. Default: env REDOX_LAKE_CATALOG, else 'sqlite'.",
    )
    data_path: str | None = Field(
        default=None,
        description="Where Parquet files go: a folder or an object-store URL (s3://...). "
        "Default: env REDOX_LAKE_DATA_PATH, else <lake>/data. Only read when the catalog is created.",
    )
    writer_lock_timeout_s: float = Field(
        default=600.0, description="How long a writer waits for another writer to finish."
    )
    busy_timeout_ms: int = Field(
        default=30_000, description="SQLite catalog busy timeout for every connection, in ms."
    )
    sqlite_journal_mode: str = Field(
        default="wal",
        description="Journal mode the writer sets on a SQLite catalog. WAL lets readers read while the "
        "writer commits; it needs a local filesystem (not NFS). Other modes make readers wait.",
    )

    # ---- locations ---------------------------------------------------------------------------

    @property
    def lake_path(self) -> Path:
        return Path(self.lake_dir).expanduser().resolve() if self.lake_dir else settings.lake_dir()

    @property
    def catalog_spec(self) -> CatalogSpec:
        value = self.catalog if self.catalog is not None else os.environ.get("REDOX_LAKE_CATALOG")
        return parse_catalog(value, self.lake_path)

    @property
    def data_location(self) -> str:
        value = self.data_path or os.environ.get("REDOX_LAKE_DATA_PATH")
        if value:
            return value if "://" in value else str(Path(value).expanduser().resolve())
        return str(self.lake_path / "data")

    def describe(self) -> str:
        """Where the lake is, safe to log (no password)."""
        return f"catalog={self.catalog_spec.describe()} data={self.data_location}"

    # ---- connections -------------------------------------------------------------------------

    def connect(self, read_only: bool = True) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with the lake attached as ``lake`` (and ``USE lake``), session in UTC.

        Read-only by default: that is what analysts, asset checks and views need, and it never blocks
        or is blocked by the writer. ``read_only=False`` is only allowed while this process holds the
        writer lock (use ``writer()``), so nothing can write around the single-writer rule.
        """
        if not read_only and not held_by_this_process(self.lake_path / LOCK_FILE):
            raise RuntimeError("a read-write lake connection needs the writer lock: use Warehouse.writer()")
        return self._open(read_only=read_only)

    @contextlib.contextmanager
    def writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Hold the lake's writer lock and yield a read-write connection with every table present."""
        lake = self.lake_path
        lake.mkdir(mode=0o700, parents=True, exist_ok=True)
        with writer_lock(lake / LOCK_FILE, timeout=self.writer_lock_timeout_s):
            con = self._open(read_only=False)
            try:
                self._ensure(con)
                yield con
            finally:
                con.close()

    def _open(self, *, read_only: bool) -> duckdb.DuckDBPyConnection:
        spec = self.catalog_spec
        exists = spec.exists()
        if read_only and exists is False:
            raise LakeNotFoundError(
                f"no lake at {spec.describe()}: nothing has been loaded yet (run `redox-etl sync`), "
                "or REDOX_ETL_HOME / REDOX_ETL_LAKE / --lake points somewhere else"
            )
        identity = None if exists is False else _catalog_identity(spec)
        if identity is None:
            # Creating the lake (or one not yet readable): a one-off instance; later calls cache.
            con = self._attach(spec, read_only=read_only, create=exists is False or not read_only)
        else:
            key = (
                os.getpid(),  # an instance inherited through fork is never reused
                spec.attach_uri,
                self.data_location,
                read_only,
                self.busy_timeout_ms,
                self.sqlite_journal_mode,
                identity,  # a lake deleted and recreated at the same path is a new lake
            )
            con = _cached_cursor(key, lambda: self._attach(spec, read_only=read_only, create=False))
        try:
            # Session settings: every connection shows TIMESTAMPTZ in UTC and, from inside Dagster
            # steps and CLI pipes, never draws progress bars.
            con.execute("SET TimeZone = 'UTC'")
            con.execute("SET enable_progress_bar = false")
            con.execute(f"USE {LAKE}")
        except BaseException:
            con.close()
            raise
        return con

    def _attach(self, spec: CatalogSpec, *, read_only: bool, create: bool) -> duckdb.DuckDBPyConnection:
        """A new in-memory DuckDB instance with the extensions loaded and the lake attached."""
        if spec.kind != "sqlite" and not read_only and not self._data_path_configured():
            raise ValueError(
                "a Postgres catalog needs REDOX_LAKE_DATA_PATH (or Warehouse(data_path=...)) set to the "
                "same data location on every writer, e.g. s3://bucket/lake/"
            )
        con = duckdb.connect()
        try:
            # An extension LOAD on a busy machine is slow enough to draw a progress bar otherwise.
            con.execute("SET enable_progress_bar = false")
            load_extensions(con, ("ducklake", *spec.extensions, *storage_extensions(self.data_location)))
            options = []
            if read_only:
                options.append("READ_ONLY")
            elif create or (spec.kind != "sqlite" and self._data_path_configured()):
                # An existing catalog pins its data path, and passing a different one (e.g. after
                # the lake folder moved) is an error rather than a useful default, so only at
                # creation; for Postgres creation is not knowable here, so only when configured.
                self._prepare_data_path()
                options.append(f"DATA_PATH '{_q(self.data_location)}'")
            if spec.kind == "sqlite":
                # DuckLake opens a SQLite connection per transaction; the busy timeout makes a reader
                # that meets a committing writer wait for the commit instead of failing, and WAL (set
                # by the writer, persistent in the file) lets readers read while the writer commits.
                options.append(f"META_BUSY_TIMEOUT {int(self.busy_timeout_ms)}")
                if not read_only:
                    options.append(f"META_JOURNAL_MODE '{_q(self.sqlite_journal_mode)}'")
                    Path(spec.target).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            failed: duckdb.Error | None = None
            try:
                con.execute(f"ATTACH '{_q(spec.attach_uri)}' AS {LAKE} ({', '.join(options)})")
            except duckdb.Error as exc:
                failed = exc
            if failed is not None:
                # Raised outside the except block, so the original (password and all) is not chained.
                raise _attach_error(spec, failed, read_only=read_only)
            if spec.kind == "sqlite" and not read_only:
                _owner_only(Path(spec.target))
        except BaseException:
            con.close()
            raise
        return con

    def _data_path_configured(self) -> bool:
        return bool(self.data_path or os.environ.get("REDOX_LAKE_DATA_PATH"))

    def _prepare_data_path(self) -> None:
        location = self.data_location
        if "://" not in location:
            Path(location).mkdir(mode=0o700, parents=True, exist_ok=True)

    # ---- schema ------------------------------------------------------------------------------

    def ensure_tables(self) -> list[str]:
        """Create missing tables and add missing columns; returns what changed (``table``, ``table.col``)."""
        self.lake_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with writer_lock(self.lake_path / LOCK_FILE, timeout=self.writer_lock_timeout_s):
            con = self._open(read_only=False)
            try:
                return self._ensure(con)
            finally:
                con.close()

    def _ensure(self, con: duckdb.DuckDBPyConnection) -> list[str]:
        wanted = lake_schemas()
        rows = con.execute(
            "SELECT table_name, column_name, data_type FROM duckdb_columns() "
            "WHERE database_name = ? AND schema_name = 'main'",
            [LAKE],
        ).fetchall()
        existing: dict[str, dict[str, str]] = {}
        for table, column, data_type in rows:
            existing.setdefault(table, {})[column] = data_type
        statements: list[str] = []
        changed: list[str] = []
        for table, columns in wanted.items():
            have = existing.get(table)
            if have is None:
                statements.append(f"CREATE TABLE {LAKE}.main.{quote_ident(table)} ({columns_sql(columns)})")
                changed.append(table)
                continue
            for column, dtype in columns.items():
                if column not in have:
                    statements.append(
                        f"ALTER TABLE {LAKE}.main.{quote_ident(table)} "
                        f"ADD COLUMN {quote_ident(column)} {duckdb_type(dtype)}"
                    )
                    changed.append(f"{table}.{column}")
                elif normalize_type(have[column]) != normalize_type(duckdb_type(dtype)):
                    raise SchemaMismatchError(
                        f"lake column {table}.{column} is {have[column]} but schema/__init__.py "
                        f"declares {duckdb_type(dtype)}; migrate the lake table explicitly"
                    )
        if not statements:
            return []
        new_lake = not existing
        with _transaction(con, message="create or extend tables", extra={"changed": changed}):
            for statement in statements:
                con.execute(statement)
        if new_lake:
            con.execute(f"CALL {LAKE}.set_option('data_inlining_row_limit', 0)")
            con.execute(f"CALL {LAKE}.set_option('parquet_compression', 'zstd')")
        for table, limit in _INLINED_TABLES.items():
            if table in changed:
                con.execute(
                    f"CALL {LAKE}.set_option('data_inlining_row_limit', {int(limit)}, table_name => ?)",
                    [table],
                )
        log.info("warehouse schema: %d change(s): %s", len(changed), ", ".join(changed))
        return changed

    # ---- writes ------------------------------------------------------------------------------

    def merge(
        self,
        table: str,
        frame: pl.DataFrame,
        *,
        partition_day: dt.date,
        run_id: str,
        source_surface: str,
        quarantine: pl.DataFrame | None = None,
    ) -> MergeStats:
        """Upsert one partition of one surface into a clinical table: newest version of a record wins.

        Rows are matched on NATURAL_KEY. An incoming row replaces the stored one unless both carry a
        ``source_updated_at`` and the incoming one is strictly older (then it is ignored and counted):
        equal timestamps replace, so a rerun of a partition rewrites it rather than duplicating it.
        Several versions of one key in ``frame`` collapse to the newest first (ties: the later row).
        Lineage columns are filled here, and a ``partition_loads`` row records the load, all in one
        transaction. With ``quarantine`` (this partition's unparseable records of this table and
        surface), the partition's quarantine share is replaced in the same transaction, so every
        snapshot has loaded + quarantined = fetched for the partition (``partition_loads.quarantined``).
        """
        if table not in CLINICAL:
            raise ValueError(f"merge() loads clinical tables {sorted(CLINICAL)}, not {table!r}")
        _check_frame(table, frame, CLINICAL[table])
        _check_constant(frame, "source_surface", source_surface, table)
        if quarantine is not None:
            _check_quarantine(quarantine, entity=table, source_surface=source_surface)
        latest = _newest_per_key(frame)
        now = _utcnow()
        staged = _with_lineage(latest, partition_day, run_id, now)
        columns = list(lake_schemas()[table])
        target = f"{LAKE}.main.{quote_ident(table)}"
        on = " AND ".join(f"t.{quote_ident(k)} = s.{quote_ident(k)}" for k in NATURAL_KEY)
        # NULL-safe "strictly older": a missing timestamp on either side never makes a row older.
        older = "coalesce(s.source_updated_at < t.source_updated_at, false)"
        key_cols = ", ".join(quote_ident(k) for k in NATURAL_KEY)
        count_sql = (
            "SELECT count(*) FILTER (WHERE t._hit IS NULL),"
            f" count(*) FILTER (WHERE t._hit AND NOT {older}),"
            f" count(*) FILTER (WHERE t._hit AND {older})"
            f" FROM _incoming AS s LEFT JOIN"
            f" (SELECT {key_cols}, source_updated_at, true AS _hit FROM {target}) AS t ON {on}"
        )
        merge_sql = (
            f"MERGE INTO {target} AS t USING _incoming AS s ON ({on})"
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
            self.writer() as con,
            _registered(con, "_incoming", staged),
            _registered(con, "_quarantine", staged_quarantine),
        ):
            with _transaction(con, message=message, extra={"run_id": run_id}):
                counts = con.execute(count_sql).fetchone()
                assert counts is not None
                inserted, updated, ignored = (int(n) for n in counts)
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
                )
                if staged_quarantine is not None:
                    _replace_quarantine_rows(
                        con, "_quarantine", staged_quarantine.columns, table, source_surface, partition_day
                    )
                self._record_load(con, stats, now)
            stats = dataclasses.replace(stats, snapshot_id=_current_snapshot(con))
        log.info(
            "merged %s/%s day=%s: rows=%d inserted=%d updated=%d ignored_older=%d duplicates=%d "
            "quarantined=%s snapshot=%s",
            table,
            source_surface,
            partition_day,
            stats.total,
            stats.inserted,
            stats.updated,
            stats.ignored_older,
            stats.duplicates,
            stats.quarantined,
            stats.snapshot_id,
        )
        return stats

    def _record_load(self, con: duckdb.DuckDBPyConnection, stats: MergeStats, now: dt.datetime) -> None:
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

    def replace_quarantine(
        self,
        frame: pl.DataFrame,
        *,
        entity: str,
        source_surface: str,
        partition_day: dt.date,
        run_id: str,
    ) -> int:
        """Replace the quarantine rows of one (entity, surface, partition day) with ``frame``.

        A rerun of a partition therefore never duplicates its quarantined records, and a rerun that
        no longer quarantines anything (a mapping was fixed) empties that partition's share.
        """
        _check_quarantine(frame, entity=entity, source_surface=source_surface)
        staged = _with_lineage(frame, partition_day, run_id, _utcnow())
        message = f"quarantine {entity} {source_surface} {partition_day.isoformat()}"
        with (
            self.writer() as con,
            _registered(con, "_incoming", staged),
            _transaction(con, message=message, extra={"run_id": run_id}),
        ):
            _replace_quarantine_rows(con, "_incoming", staged.columns, entity, source_surface, partition_day)
        log.info("quarantine %s/%s day=%s: %d row(s)", entity, source_surface, partition_day, staged.height)
        return staged.height

    def append_api_calls(self, frame: pl.DataFrame, *, run_id: str, step: str) -> int:
        """Store one step's API audit trail; a retry of the same (run_id, step) replaces its rows."""
        _check_frame("api_calls", frame, API_CALLS)
        _check_constant(frame, "run_id", run_id, "api_calls")
        staged = frame.with_columns(
            pl.lit(step, pl.String()).alias("step"),
            pl.lit(_utcnow(), UTC_TS).alias("ingested_at"),
        )
        with (
            self.writer() as con,
            _registered(con, "_incoming", staged),
            _transaction(con, message=f"api_calls {step}", extra={"run_id": run_id}),
        ):
            con.execute(f"DELETE FROM {LAKE}.main.api_calls WHERE run_id = ? AND step = ?", [run_id, step])
            _insert_all(con, "api_calls", staged.columns)
        log.info("api_calls step=%s: %d row(s)", step, staged.height)
        return staged.height

    def get_watermark(self, stream: str) -> dt.datetime | None:
        """The stored watermark of ``stream`` (UTC), or None if it has never been set."""
        if self.catalog_spec.exists() is False:
            return None
        with contextlib.closing(self._open(read_only=True)) as con:
            if not _table_exists(con, "sync_state"):
                return None
            row = con.execute(
                f"SELECT watermark FROM {LAKE}.main.sync_state WHERE stream = ?", [stream]
            ).fetchone()
        if row is None or row[0] is None:
            return None
        value: dt.datetime = row[0]
        return value.astimezone(dt.UTC)

    def set_watermark(self, stream: str, ts: dt.datetime, run_id: str) -> None:
        """Store ``ts`` as the watermark of ``stream`` (replacing the previous one)."""
        if ts.tzinfo is None:
            raise ValueError("a watermark must be timezone-aware (UTC); got a naive datetime")
        columns = ", ".join(quote_ident(c) for c in SYNC_STATE)
        with (
            self.writer() as con,
            _transaction(con, message=f"watermark {stream}", extra={"run_id": run_id}),
        ):
            con.execute(f"DELETE FROM {LAKE}.main.sync_state WHERE stream = ?", [stream])
            con.execute(
                f"INSERT INTO {LAKE}.main.sync_state ({columns}) VALUES (?, ?, ?, ?)",
                [stream, ts.astimezone(dt.UTC), _utcnow(), run_id],
            )

    def queue_changes(
        self, stream: str, watermark: dt.datetime, pending: pl.DataFrame, *, run_id: str
    ) -> int:
        """Move ``stream``'s watermark and queue the partitions (``table_name``, ``partition_day``)
        that hold changed records, in one transaction: a crash leaves either both or neither, so a
        change seen is never forgotten and never looked for twice."""
        if watermark.tzinfo is None:
            raise ValueError("a watermark must be timezone-aware (UTC); got a naive datetime")
        now = _utcnow()
        staged = (
            pending.select("table_name", "partition_day")
            .unique()
            .with_columns(
                pl.lit(now, dtype=pl.Datetime("us", "UTC")).alias("queued_at"), pl.lit(run_id).alias("run_id")
            )
        )
        columns = ", ".join(quote_ident(c) for c in SYNC_STATE)
        with (
            self.writer() as con,
            _registered(con, "_incoming", staged),
            _transaction(con, message=f"changes {stream}", extra={"run_id": run_id}),
        ):
            _insert_all(con, "pending_partitions", staged.columns)
            con.execute(f"DELETE FROM {LAKE}.main.sync_state WHERE stream = ?", [stream])
            con.execute(
                f"INSERT INTO {LAKE}.main.sync_state ({columns}) VALUES (?, ?, ?, ?)",
                [stream, watermark.astimezone(dt.UTC), now, run_id],
            )
        return staged.height

    def pending_partitions(self) -> pl.DataFrame:
        """Queued (table_name, partition_day) pairs not yet loaded since they were queued."""
        with contextlib.closing(self._open(read_only=True)) as con:
            if not _table_exists(con, "pending_partitions"):  # a lake from before the queue existed
                return pl.DataFrame(
                    schema={"table_name": pl.String(), "partition_day": pl.Date(), "queued_at": UTC_TS}
                )
            return con.execute(
                f"SELECT table_name, partition_day, min(queued_at) AS queued_at FROM {LAKE}.main.pending_partitions"
                " GROUP BY ALL ORDER BY partition_day, table_name"
            ).pl()

    def clear_pending(
        self, table: str, days: Sequence[dt.date], *, loaded_since: dt.datetime, run_id: str
    ) -> None:
        """Forget the queued partitions of ``table`` on ``days`` queued before ``loaded_since`` (the
        start of the load that covered them); anything queued later stays for the next load."""
        with (
            self.writer() as con,
            _transaction(con, message=f"clear pending {table}", extra={"run_id": run_id}),
        ):
            con.execute(
                f"DELETE FROM {LAKE}.main.pending_partitions WHERE table_name = ?"
                " AND partition_day IN (SELECT unnest(?::DATE[])) AND queued_at < ?",
                [table, list(days), loaded_since],
            )

    def replace_table(self, name: str, frame: pl.DataFrame, *, run_id: str) -> int:
        """Replace a derived table (e.g. identity links) with ``frame``, whole, in one transaction.

        For tables computed from the lake rather than loaded into it; the loaded tables have their
        own methods above and are refused here.
        """
        self.write_derived(run_id=run_id, message=f"replace {name}", replace={name: frame})
        return frame.height

    def write_derived(
        self,
        *,
        run_id: str,
        message: str,
        replace: Mapping[str, pl.DataFrame] | None = None,
        append: Mapping[str, pl.DataFrame] | None = None,
        views: Mapping[str, str] | None = None,
    ) -> int | None:
        """Write several derived tables and views as ONE transaction (one snapshot); returns its id.

        A step that derives several tables from one input writes them here together, so a reader
        never sees one table from this run beside another from the last. ``replace``: each table
        becomes its frame, whole. ``append``: each frame's rows are added to its table, which is
        created with the frame's schema when absent (an empty frame only creates it). ``views``:
        name -> SELECT, created or replaced; write table names unqualified, so the view works under
        any alias the lake is attached as. Loaded tables are refused: they have their own methods.
        """
        replace, append, views = dict(replace or {}), dict(append or {}), dict(views or {})
        names = [*replace, *append, *views]
        loaded = lake_schemas()
        for name in names:
            if name in loaded:
                raise ValueError(f"{name!r} is a loaded table; use merge/replace_quarantine/... instead")
            if not name.isidentifier():
                raise ValueError(f"table or view name {name!r} must be a plain identifier")
        if len(set(names)) != len(names):
            raise ValueError("a name may appear once among replace, append and views")
        with contextlib.ExitStack() as stack:
            con = stack.enter_context(self.writer())
            staged = {}
            for i, (name, frame) in enumerate([*replace.items(), *append.items()]):
                staged[name] = f"_derived_{i}"
                stack.enter_context(_registered(con, staged[name], frame))
            with _transaction(con, message=message, extra={"run_id": run_id}):
                for name in replace:
                    con.execute(
                        f"CREATE OR REPLACE TABLE {LAKE}.main.{quote_ident(name)} AS SELECT * FROM {staged[name]}"
                    )
                for name, frame in append.items():
                    target = f"{LAKE}.main.{quote_ident(name)}"
                    con.execute(f"CREATE TABLE IF NOT EXISTS {target} ({columns_sql(dict(frame.schema))})")
                    if frame.height:
                        con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM {staged[name]}")
                for name, select in views.items():
                    con.execute(f"CREATE OR REPLACE VIEW {LAKE}.main.{quote_ident(name)} AS {select}")
            snapshot = _current_snapshot(con)
        log.info(
            "derived write %r: replaced %s, appended %s, views %s, snapshot=%s",
            message,
            {n: f.height for n, f in replace.items()},
            {n: f.height for n, f in append.items()},
            sorted(views),
            snapshot,
        )
        return snapshot

    # ---- reads -------------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pl.DataFrame:
        """Run one read-only query against the lake and return it as a polars frame."""
        with contextlib.closing(self._open(read_only=True)) as con:
            return con.execute(sql, list(params) if params is not None else None).pl()

    def snapshots(self) -> pl.DataFrame:
        """Every snapshot still kept: id, time, what changed, and the commit message and run_id.

        Query any table as of one of them with ``SELECT ... FROM results AT (VERSION => <id>)`` or
        ``AT (TIMESTAMP => TIMESTAMPTZ '2026-01-01 00:00:00+00')``.
        """
        return self.query(f"SELECT * FROM ducklake_snapshots('{LAKE}') ORDER BY snapshot_id")

    # ---- maintenance -------------------------------------------------------------------------

    def maintain(
        self,
        *,
        expire_older_than: dt.timedelta = dt.timedelta(days=30),
        delete_files_older_than: dt.timedelta = dt.timedelta(days=1),
    ) -> MaintenanceReport:
        """Compact small files, expire old snapshots and delete the files nothing references anymore.

        Snapshots younger than ``expire_older_than`` stay queryable with ``AT (VERSION => n)``. Files
        are only deleted once unreferenced for ``delete_files_older_than``, so a reader still scanning
        an older snapshot keeps its files. Runs as a writer (it rewrites files).
        """
        now = _utcnow()
        with self.writer() as con:
            merged = _count(con.execute(f"CALL ducklake_merge_adjacent_files('{LAKE}')"))
            expired = _count(
                con.execute(
                    f"CALL ducklake_expire_snapshots('{LAKE}', older_than => ?)", [now - expire_older_than]
                )
            )
            deleted = _count(
                con.execute(
                    f"CALL ducklake_cleanup_old_files('{LAKE}', older_than => ?)",
                    [now - delete_files_older_than],
                )
            )
            # Files a killed writer wrote but never committed; the writer lock guarantees none is in flight.
            orphans = _count(
                con.execute(
                    f"CALL ducklake_delete_orphaned_files('{LAKE}', older_than => ?)",
                    [now - delete_files_older_than],
                )
            )
            snapshot = _current_snapshot(con)
        report = MaintenanceReport(merged, expired, deleted, orphans, snapshot)
        log.info("warehouse maintenance: %s", dataclasses.asdict(report))
        return report


# ---- helpers ---------------------------------------------------------------------------------

# Loading the extensions (signature checks) and attaching cost ~0.2 s per DuckDB instance, more than
# most writes here; so each process keeps a few attached instances and hands out cursors, which are
# independent connections (own transaction, own session settings) to the same instance.
_INSTANCES_KEPT = 8
_instances: "collections.OrderedDict[tuple[object, ...], duckdb.DuckDBPyConnection]" = (
    collections.OrderedDict()
)
_instances_guard = threading.Lock()


def _cached_cursor(
    key: tuple[object, ...], attach: Callable[[], duckdb.DuckDBPyConnection]
) -> duckdb.DuckDBPyConnection:
    """A new connection (cursor) to the process's instance for ``key``, attaching it if needed."""
    with _instances_guard:
        base = _instances.get(key)
        if base is None:
            base = _instances[key] = attach()
            while len(_instances) > _INSTANCES_KEPT:
                # Dropped, not closed: close() would end the instance under cursors still in use;
                # it is freed when the last of them goes.
                _instances.popitem(last=False)
        else:
            _instances.move_to_end(key)
        return base.cursor()


def _catalog_identity(spec: CatalogSpec) -> tuple[object, ...] | None:
    """What tells this SQLite catalog apart from an earlier one at the same path, or None if unreadable.

    The inode alone is not enough (a deleted file's inode number is often reused at once), so the
    creation time of snapshot 0, which DuckLake writes once per lake, is part of it. Postgres
    catalogs have no such local identity; their key is the conninfo.
    """
    path = spec.sqlite_path
    if path is None:
        return ("postgres",)
    try:
        stat = path.stat()
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)) as db:
            row = db.execute("SELECT snapshot_time FROM ducklake_snapshot WHERE snapshot_id = 0").fetchone()
    except (OSError, sqlite3.Error):
        return None
    return None if row is None else (stat.st_dev, stat.st_ino, str(row[0]))


def _attach_error(spec: CatalogSpec, error: duckdb.Error, *, read_only: bool) -> Exception:
    """The ATTACH failure as it may be shown: DuckDB quotes the whole conninfo, password included.

    A read-only attach of a Postgres database that holds no lake yet is LakeNotFoundError, as an
    absent SQLite catalog is, so callers that treat "nothing loaded yet" as a state still can.
    """
    text = redact(str(error))
    if read_only and "does not exist" in text and "creating a new DuckLake is explicitly disabled" in text:
        return LakeNotFoundError(
            f"no lake at {spec.describe()}: nothing has been loaded yet (run `redox-etl sync`), "
            "or REDOX_LAKE_CATALOG points at another database"
        )
    return type(error)(text)


def _q(text: str) -> str:
    return text.replace("'", "''")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_frame(table: str, frame: pl.DataFrame, schema: pl.Schema) -> None:
    """Refuse a frame whose columns or dtypes differ from the schema (names only in the message)."""
    if frame.schema == schema:
        return
    have = frame.schema
    missing = [c for c in schema if c not in have]
    extra = [c for c in have if c not in schema]
    wrong = {c: f"{have[c]} (want {schema[c]})" for c in schema if c in have and have[c] != schema[c]}
    order = not missing and not extra and not wrong
    raise ValueError(
        f"frame for {table} does not match schema/__init__.py: missing={missing} extra={extra} "
        f"wrong_dtype={wrong}{' column order differs' if order else ''}; pass it through schema.conform()"
    )


def _check_constant(frame: pl.DataFrame, column: str, expected: str, table: str) -> None:
    if frame.height and not frame.get_column(column).eq_missing(expected).all():
        found = frame.get_column(column).unique().sort(nulls_last=True).to_list()[:5]
        raise ValueError(f"{table}: every row's {column} must be {expected!r}, found {found}")


def _check_quarantine(frame: pl.DataFrame, *, entity: str, source_surface: str) -> None:
    _check_frame("quarantine", frame, QUARANTINE)
    _check_constant(frame, "entity", entity, "quarantine")
    _check_constant(frame, "source_surface", source_surface, "quarantine")


def _with_lineage(frame: pl.DataFrame, partition_day: dt.date, run_id: str, now: dt.datetime) -> pl.DataFrame:
    return frame.with_columns(
        pl.lit(partition_day, pl.Date()).alias("partition_day"),
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
    con.execute(
        f"DELETE FROM {LAKE}.main.quarantine WHERE entity = ? AND source_surface = ? AND partition_day = ?",
        [entity, source_surface, partition_day],
    )
    names = ", ".join(quote_ident(c) for c in columns)
    con.execute(f"INSERT INTO {LAKE}.main.quarantine ({names}) SELECT {names} FROM {source}")


def _newest_per_key(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per natural key: the newest source_updated_at (NULL counts as oldest; ties: later row)."""
    keys = list(NATURAL_KEY)
    if frame.select(pl.struct(keys).n_unique()).item() == frame.height:
        return frame
    return (
        frame.with_row_index("_order")
        .sort(["source_updated_at", "_order"], nulls_last=False)
        .unique(subset=keys, keep="last", maintain_order=True)
        .sort("_order")
        .drop("_order")
    )


@contextlib.contextmanager
def _registered(con: duckdb.DuckDBPyConnection, name: str, frame: pl.DataFrame | None) -> Iterator[None]:
    if frame is None:
        yield
        return
    # Arrow hand-off: DuckDB scans the frame's buffers in place; no row ever passes through Python.
    con.register(name, frame.to_arrow())
    try:
        yield
    finally:
        con.unregister(name)


@contextlib.contextmanager
def _transaction(
    con: duckdb.DuckDBPyConnection, *, message: str, extra: dict[str, Any] | None = None
) -> Iterator[None]:
    """One DuckDB transaction = one DuckLake snapshot, labelled for the audit trail; all or nothing."""
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            f"CALL {LAKE}.set_commit_message(?, ?, extra_info => ?)",
            [COMMIT_AUTHOR, message, json.dumps(extra or {}, sort_keys=True)],
        )
        yield
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise


def _insert_all(con: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str]) -> None:
    names = ", ".join(quote_ident(c) for c in columns)
    con.execute(f"INSERT INTO {LAKE}.main.{quote_ident(table)} ({names}) SELECT {names} FROM _incoming")


def _rowcount(result: duckdb.DuckDBPyConnection) -> int:
    row = result.fetchone()
    return int(row[0]) if row else 0


def _count(result: duckdb.DuckDBPyConnection) -> int:
    return len(result.fetchall())


def _current_snapshot(con: duckdb.DuckDBPyConnection) -> int | None:
    row = con.execute(f"SELECT id FROM ducklake_current_snapshot('{LAKE}')").fetchone()
    return int(row[0]) if row else None


def _table_exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    row = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main' "
        "AND table_name = ?",
        [LAKE, table],
    ).fetchone()
    return bool(row and row[0])


def _owner_only(catalog: Path) -> None:
    """The SQLite catalog and its WAL files, owner-only: they hold per-file column statistics."""
    for path in (catalog, catalog.with_name(catalog.name + "-wal"), catalog.with_name(catalog.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
