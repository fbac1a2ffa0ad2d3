"""The Warehouse resource: the one object the pipeline holds to read and write the DuckLake lake.

A thin facade: it holds the configuration (set by whoever builds it; the bucket's credentials alone
are read from the settings when a connection opens, so they never enter Dagster's resource config
or UI) and hands each job to the module named for it: ``connection`` (attach, readers, the
writer lock), ``migrate`` (tables in step with the schema), ``merge`` (clinical loads),
``audit`` (api_calls), ``state`` (watermarks, change queue), ``derived`` (computed tables and
views), ``maintenance``.

Invariants (kept by those modules, stated here for the reader of the public API):
- every write runs under the cross-process writer lock; each load (merge, api_calls, watermark,
  derived write) is ONE DuckDB transaction, i.e. one DuckLake snapshot, so a reader sees all of a
  partition's load or none of it and a crash mid-write leaves nothing partial visible (maintenance
  is a sequence of DuckLake calls, each atomic, none changing table contents);
- readers attach READ_ONLY and never block or wait for the writer; every session is in UTC;
- the resource reads no clinical column but the natural key and ``source_updated_at``;
- nothing about a row's contents is logged or put in an exception: table names, counts, snapshot ids.
"""

import contextlib
import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
from dagster import ConfigurableResource
from pydantic import Field

from resources import settings
from resources.warehouse import audit, captured, connection, derived, maintenance, merge, migrate, state
from resources.warehouse.catalog import CatalogSpec, parse_catalog
from resources.warehouse.maintenance import MaintenanceReport
from resources.warehouse.merge import MergeStats
from resources.warehouse.objectstore import ObjectStore


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
        "'postgres:<libpq conninfo>'. Deployments set it from REDOX_LAKE_CATALOG.",
    )
    data_path: str | None = Field(
        default=None,
        description="Where Parquet files go: a folder or an object-store URL (s3://...). Default: "
        "<lake>/data. Deployments set it from REDOX_LAKE_DATA_PATH. Only read when the catalog is created.",
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
        return parse_catalog(self.catalog, self.lake_path)

    @property
    def data_location(self) -> str:
        if self.data_path:
            return (
                self.data_path
                if "://" in self.data_path
                else str(Path(self.data_path).expanduser().resolve())
            )
        return str(self.lake_path / "data")

    def describe(self) -> str:
        """Where the lake is, safe to log (no password)."""
        return f"catalog={self.catalog_spec.describe()} data={self.data_location}"

    def _lake(self) -> connection.LakeConfig:
        return connection.LakeConfig(
            root=self.lake_path,
            catalog=self.catalog_spec,
            data_location=self.data_location,
            data_path_configured=bool(self.data_path),
            busy_timeout_ms=self.busy_timeout_ms,
            journal_mode=self.sqlite_journal_mode,
            lock_timeout_s=self.writer_lock_timeout_s,
            object_store=_object_store(self.data_location),
        )

    # ---- connections -------------------------------------------------------------------------

    def connect(self, read_only: bool = True) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with the lake attached as ``lake`` (and ``USE lake``), session in UTC.

        Read-only by default: that is what analysts, asset checks and views need, and it never blocks
        or is blocked by the writer. ``read_only=False`` is only allowed while this process holds the
        writer lock (use ``writer()``), so nothing can write around the single-writer rule.
        """
        return connection.connect(self._lake(), read_only=read_only)

    def connect_contained(self) -> duckdb.DuckDBPyConnection:
        """A read-only connection that reads the lake and no other file (for SQL people type)."""
        return connection.contained_reader(self._lake())

    @contextlib.contextmanager
    def writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Hold the lake's writer lock and yield a read-write connection with every table present."""
        with connection.writer(self._lake()) as con:
            migrate.ensure(con)
            yield con

    def ensure_tables(self) -> list[str]:
        """Create missing tables and add missing columns; returns what changed (``table``, ``table.col``)."""
        with connection.writer(self._lake()) as con:
            return migrate.ensure(con)

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

        Rows are matched on NATURAL_KEY; which version wins is ``schema.versions``'s rule. An incoming
        row replaces the stored one unless both carry a ``source_updated_at`` and the incoming one is
        strictly older (then it is ignored and counted): equal timestamps replace, so a rerun of a
        partition rewrites it rather than duplicating it. Several versions of one key in ``frame``
        collapse to the newest first (ties: the later row). Lineage columns are filled here, and a
        ``partition_loads`` row records the load, all in one transaction. With ``quarantine`` (this
        partition's unparseable records of this table and surface), the partition's quarantine share
        is replaced in the same transaction, so every snapshot has loaded + quarantined = fetched for
        the partition (``partition_loads.quarantined``).
        """
        return merge.merge(
            self.writer,
            table,
            frame,
            partition_day=partition_day,
            run_id=run_id,
            source_surface=source_surface,
            quarantine=quarantine,
        )

    def replace_coverage(
        self, coverage: pl.DataFrame, partitions: Sequence[tuple[str, str, str]], *, run_id: str
    ) -> None:
        """Replace ``field_coverage``'s rows of these (surface, entity, partition) with ``coverage``."""
        captured.replace_coverage(self.writer, coverage, partitions, run_id=run_id)

    def record_captured(self, files: pl.DataFrame, quarantine: pl.DataFrame, *, run_id: str) -> None:
        """A captured file's ``captured_files`` row and quarantine rows, in one transaction."""
        captured.record_captured(self.writer, files, quarantine, run_id=run_id)

    def create_source_pages(self, landing_root: Path) -> None:
        """Create or replace the ``source_pages`` view over the landing zone under ``landing_root``."""
        captured.create_source_pages(self.writer, landing_root, run_id="source_pages")

    def append_api_calls(self, frame: pl.DataFrame, *, run_id: str, step: str) -> int:
        """Store one step's API audit trail; a retry of the same (run_id, step) replaces its rows."""
        return audit.append_api_calls(self.writer, frame, run_id=run_id, step=step)

    def get_watermark(self, stream: str) -> dt.datetime | None:
        """The stored watermark of ``stream`` (UTC), or None if it has never been set."""
        if self.catalog_spec.exists() is False:
            return None
        with contextlib.closing(self.connect()) as con:
            return state.read_watermark(con, stream)

    def queue_changes(
        self, stream: str, watermark: dt.datetime, pending: pl.DataFrame, *, run_id: str
    ) -> int:
        """Move ``stream``'s watermark and queue the partitions (``table_name``, ``partition_day``)
        that hold changed records, in one transaction: a crash leaves either both or neither, so a
        change seen is never forgotten and never looked for twice."""
        return state.queue_changes(self.writer, stream, watermark, pending, run_id=run_id)

    def pending_partitions(self) -> pl.DataFrame:
        """Queued (table_name, partition_day) pairs not yet loaded since they were queued."""
        with contextlib.closing(self.connect()) as con:
            return state.read_pending(con)

    def clear_pending(
        self, table: str, days: Sequence[dt.date], *, loaded_since: dt.datetime, run_id: str
    ) -> None:
        """Forget the queued partitions of ``table`` on ``days`` queued before ``loaded_since`` (the
        start of the load that covered them); anything queued later stays for the next load."""
        state.clear_pending(self.writer, table, days, loaded_since=loaded_since, run_id=run_id)

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
        return derived.write_derived(
            self.writer, run_id=run_id, message=message, replace=replace, append=append, views=views
        )

    # ---- reads and maintenance ---------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pl.DataFrame:
        """Run one read-only query against the lake and return it as a polars frame."""
        with contextlib.closing(self.connect()) as con:
            return con.execute(sql, list(params) if params is not None else None).pl()

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
        return maintenance.maintain(
            self.writer, expire_older_than=expire_older_than, delete_files_older_than=delete_files_older_than
        )


def _object_store(data_location: str) -> ObjectStore | None:
    """The bucket the settings describe, when the lake's files are in one (or a bucket is configured)."""
    conf = settings.Settings.from_env()
    if not (conf.s3_endpoint or conf.s3_access_key_id or data_location.lower().startswith("s3://")):
        return None
    return ObjectStore(
        region=conf.s3_region,
        url_style=conf.s3_url_style,
        use_ssl=conf.s3_use_ssl,
        endpoint=conf.s3_endpoint,
        key_id=conf.s3_access_key_id,
        secret=conf.s3_secret_access_key,
        session_token=conf.s3_session_token,
    )
