"""Opening the lake: attach DuckLake to DuckDB, read-only for readers, read-write under the writer lock.

Invariants:
- a read-write connection exists only while this process holds the lake's writer lock (with a
  Postgres catalog, the advisory lock every machine's writers share);
- readers attach the lake READ_ONLY and read one DuckLake snapshot per transaction, so they never
  block the writer and are never blocked by it (SQLite catalog in WAL mode with a busy timeout;
  docs/operations.md "Warehouse" says why);
- every connection's session TimeZone is UTC, so TIMESTAMPTZ values display and cast in UTC;
- an ATTACH error is shown with its password redacted and without the original chained to it.

Everything here is told where the lake is (``LakeConfig``); nothing reads the environment.
"""

import collections
import contextlib
import dataclasses
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb

from resources.warehouse.catalog import CatalogSpec, redact
from resources.warehouse.extensions import load_extensions, storage_extensions
from resources.warehouse.lock import held_by_this_process, writer_lock
from resources.warehouse.objectstore import ObjectStore, install_secret

LAKE = "lake"  # the alias every connection attaches the lake under; SQL in docs and views uses it
LOCK_FILE = ".writer.lock"


class LakeNotFoundError(FileNotFoundError):
    """A reader asked for a lake that has never been written."""


@dataclasses.dataclass(frozen=True, slots=True)
class LakeConfig:
    """Where one lake lives and how to attach it, as resolved by the ``Warehouse`` resource."""

    root: Path  # the lake folder: writer lock, and the SQLite catalog and data files by default
    catalog: CatalogSpec
    data_location: str  # a resolved folder or an object-store URL
    data_path_configured: bool  # whether data_location was set explicitly rather than defaulted
    busy_timeout_ms: int
    journal_mode: str
    lock_timeout_s: float
    # Set when the lake's files are (or may be) in a bucket: every instance gets the S3 secret.
    object_store: ObjectStore | None = None

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE


def connect(lake: LakeConfig, *, read_only: bool) -> duckdb.DuckDBPyConnection:
    """A connection with the lake attached as ``lake`` (and ``USE lake``), session in UTC.

    ``read_only=False`` is refused unless this process holds the writer lock (see ``writer``), so
    nothing can write around the single-writer rule.
    """
    if not read_only and not held_by_this_process(lake.lock_file):
        raise RuntimeError("a read-write lake connection needs the writer lock: use Warehouse.writer()")
    return _open(lake, read_only=read_only)


def contained_reader(lake: LakeConfig) -> duckdb.DuckDBPyConnection:
    """A read-only connection that can read the lake and no other file, URL or extension.

    For sessions that run SQL a person typed (``redox-etl sql``): DuckDB's file functions
    (``read_csv``, ``read_text``, ``glob``, ``ATTACH``, ``COPY``) would otherwise reach anything this
    user can read, such as credentials beside the lake. After the attach, external access is turned
    off with the lake's data location as the only allowed directory (DuckLake allows its own catalog
    files), and the configuration is locked so no statement can turn it back on. Those settings are
    per DuckDB instance, so this connection gets an instance of its own, never a shared one.
    """
    spec = lake.catalog
    if spec.exists() is False:
        raise LakeNotFoundError(
            f"no lake at {spec.describe()}: nothing has been loaded yet (run `redox-etl sync`), "
            "or REDOX_ETL_HOME / REDOX_ETL_LAKE / --lake points somewhere else"
        )
    con = _attach(lake, read_only=True, create=False)
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"USE {LAKE}")
        # The data path the catalog pinned, not this machine's setting: a reader of a shared
        # (Postgres) catalog often has none, and the catalog's is where the files are.
        pinned = con.execute(f"SELECT data_path FROM ducklake_settings('{LAKE}')").fetchone()
        data = (pinned[0] if pinned and pinned[0] else lake.data_location).rstrip("/") + "/"
        con.execute("SET allowed_directories = $dirs", {"dirs": [data]})
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


@contextlib.contextmanager
def writer(lake: LakeConfig) -> Iterator[duckdb.DuckDBPyConnection]:
    """Hold the lake's writer lock and yield a read-write connection, closed on leaving."""
    lake.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _require_shared_data_path(lake)
    # A shared (Postgres) catalog has writers on several machines: the flock alone cannot see them.
    shared = lake.catalog.target if lake.catalog.kind == "postgres" else None
    with writer_lock(lake.lock_file, timeout=lake.lock_timeout_s, shared=shared):
        con = _open(lake, read_only=False)
        try:
            yield con
        finally:
            con.close()


def _open(lake: LakeConfig, *, read_only: bool) -> duckdb.DuckDBPyConnection:
    spec = lake.catalog
    exists = spec.exists()
    if read_only and exists is False:
        raise LakeNotFoundError(
            f"no lake at {spec.describe()}: nothing has been loaded yet (run `redox-etl sync`), "
            "or REDOX_ETL_HOME / REDOX_ETL_LAKE / --lake points somewhere else"
        )
    identity = None if exists is False else _catalog_identity(spec)
    if identity is None:
        # Creating the lake (or one not yet readable): a one-off instance; later calls cache.
        con = _attach(lake, read_only=read_only, create=exists is False or not read_only)
    else:
        key = (
            os.getpid(),  # an instance inherited through fork is never reused
            spec.attach_uri,
            lake.data_location,
            lake.object_store,
            read_only,
            lake.busy_timeout_ms,
            lake.journal_mode,
            identity,  # a lake deleted and recreated at the same path is a new lake
        )
        con = _cached_cursor(key, lambda: _attach(lake, read_only=read_only, create=False))
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


def _require_shared_data_path(lake: LakeConfig) -> None:
    # Checked before the writer lock too: a misconfigured writer is refused before it connects.
    if lake.catalog.kind != "sqlite" and not lake.data_path_configured:
        raise ValueError(
            "a Postgres catalog needs REDOX_LAKE_DATA_PATH (or Warehouse(data_path=...)) set to the "
            "same data location on every writer, e.g. s3://bucket/lake/"
        )


def _attach(lake: LakeConfig, *, read_only: bool, create: bool) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB instance with the extensions loaded and the lake attached."""
    spec = lake.catalog
    if not read_only:
        _require_shared_data_path(lake)
    con = duckdb.connect()
    try:
        # An extension LOAD on a busy machine is slow enough to draw a progress bar otherwise.
        con.execute("SET enable_progress_bar = false")
        storage = storage_extensions(lake.data_location)
        if lake.object_store is not None:
            # A reader is not told the data path (the catalog holds it), so the secret and httpfs
            # come with the configured bucket, not with the data location.
            storage = (*(e for e in storage if e != "httpfs"), "httpfs")
        load_extensions(con, ("ducklake", *spec.extensions, *storage))
        if lake.object_store is not None:
            install_secret(con, lake.object_store)
        options = []
        if read_only:
            options.append("READ_ONLY")
        elif create or (spec.kind != "sqlite" and lake.data_path_configured):
            # An existing catalog pins its data path, and passing a different one (e.g. after
            # the lake folder moved) is an error rather than a useful default, so only at
            # creation; for Postgres creation is not knowable here, so only when configured.
            if "://" not in lake.data_location:
                Path(lake.data_location).mkdir(mode=0o700, parents=True, exist_ok=True)
            options.append(f"DATA_PATH '{_q(lake.data_location)}'")
        if spec.kind == "sqlite":
            # DuckLake opens a SQLite connection per transaction; the busy timeout makes a reader
            # that meets a committing writer wait for the commit instead of failing, and WAL (set
            # by the writer, persistent in the file) lets readers read while the writer commits.
            options.append(f"META_BUSY_TIMEOUT {int(lake.busy_timeout_ms)}")
            if not read_only:
                options.append(f"META_JOURNAL_MODE '{_q(lake.journal_mode)}'")
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


def _owner_only(catalog: Path) -> None:
    """The SQLite catalog and its WAL files, owner-only: they hold per-file column statistics."""
    for path in (catalog, catalog.with_name(catalog.name + "-wal"), catalog.with_name(catalog.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
