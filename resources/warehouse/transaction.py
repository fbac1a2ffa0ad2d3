"""One write, one snapshot: the transaction and staging helpers every writing module uses.

Invariant: a write runs in ONE DuckDB transaction, i.e. one DuckLake snapshot labelled with a commit
message and its run_id, so a reader sees all of it or none of it and a crash mid-write leaves nothing
partial visible. Frames reach DuckDB through Arrow, never row by row through Python.
"""

import contextlib
import datetime as dt
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import duckdb
import polars as pl

from resources.warehouse.connection import LAKE
from resources.warehouse.ddl import quote_ident

COMMIT_AUTHOR = "redox-etl"

# How a writing module gets its connection: the Warehouse's ``writer()`` (lock held, tables present).
Writer = Callable[[], contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]]


@contextlib.contextmanager
def transaction(
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


@contextlib.contextmanager
def registered(con: duckdb.DuckDBPyConnection, name: str, frame: pl.DataFrame | None) -> Iterator[None]:
    """``frame`` visible to ``con`` as the view ``name`` for the block (nothing when it is None)."""
    if frame is None:
        yield
        return
    # Arrow hand-off: DuckDB scans the frame's buffers in place; no row ever passes through Python.
    con.register(name, frame.to_arrow())
    try:
        yield
    finally:
        con.unregister(name)


def insert_all(con: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str]) -> None:
    """Insert every row of the registered ``_incoming`` into the lake table ``table``."""
    names = ", ".join(quote_ident(c) for c in columns)
    con.execute(f"INSERT INTO {LAKE}.main.{quote_ident(table)} ({names}) SELECT {names} FROM _incoming")


def current_snapshot(con: duckdb.DuckDBPyConnection) -> int | None:
    row = con.execute(f"SELECT id FROM ducklake_current_snapshot('{LAKE}')").fetchone()
    return int(row[0]) if row else None


def table_exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    row = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main' "
        "AND table_name = ?",
        [LAKE, table],
    ).fetchone()
    return bool(row and row[0])


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
