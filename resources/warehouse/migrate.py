"""The lake's tables and columns, kept in step with the schema package: create, extend, refuse drift.

``lake_schemas()`` is every lake table as it must look: ``schema.TABLES`` with load lineage, plus the
warehouse's own bookkeeping tables. ``ensure`` makes the lake match it, comments from the data
dictionary included (``comments``).

Invariant: tables and columns are only ever added, in one transaction; a column whose type differs
from the schema raises ``SchemaMismatchError`` instead of being altered, so no load ever writes
into a column it does not match.
"""

import logging

import duckdb
import polars as pl

from resources.warehouse import comments
from resources.warehouse.connection import LAKE
from resources.warehouse.ddl import columns_sql, duckdb_type, normalize_type, quote_ident
from resources.warehouse.transaction import transaction
from schema import API_CALLS_LINEAGE, LINEAGE, SOURCE_REF, TABLES, UNIFIED_TABLES, WAREHOUSE_TABLES

log = logging.getLogger(__name__)

# Bookkeeping tables hold a row or two per write. Inlining them into the catalog spares a tiny Parquet
# file (plus a delete file) per watermark update. Tables with patient data are never inlined: their
# rows stay in Parquet under the data path. The catalog still holds PHI-derived values, though:
# DuckLake keeps each data file's per-column min/max statistics there (ducklake_file_column_stats),
# e.g. the smallest and largest family name in a file. So the catalog is protected as the data is
# (owner-only file; for Postgres, the same access rules as the lake), see docs/operations.md.
_INLINED_TABLES = {"sync_state": 1000, "partition_loads": 1000, "pending_partitions": 1000}


class SchemaMismatchError(RuntimeError):
    """A lake table's column has a different type than schema/__init__.py declares."""


def lake_schemas() -> dict[str, dict[str, pl.DataType]]:
    """Every lake table and its columns in order: schema.TABLES plus load lineage, plus bookkeeping."""
    out: dict[str, dict[str, pl.DataType]] = {}
    for name, schema in TABLES.items():
        columns: dict[str, pl.DataType] = dict(schema)
        if name in UNIFIED_TABLES or name == "quarantine":
            columns.update(LINEAGE)
            if name in UNIFIED_TABLES:
                columns.update(SOURCE_REF)
        elif name == "api_calls":
            columns.update(API_CALLS_LINEAGE)
        out[name] = columns
    for name, schema in WAREHOUSE_TABLES.items():
        out[name] = dict(schema)
    return out


def ensure(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Create missing tables and add missing columns; returns what changed (``table``, ``table.col``)."""
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
        _comment(con)
        return []
    new_lake = not existing
    with transaction(con, message="create or extend tables", extra={"changed": changed}):
        for statement in statements:
            con.execute(statement)
        for statement in comments.statements(con, wanted):
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


def _comment(con: duckdb.DuckDBPyConnection) -> None:
    """Bring the loaded tables' comments in line with the dictionary (a lake made before they existed)."""
    needed = comments.statements(con, lake_schemas())
    if needed:
        with transaction(con, message="comment tables from the data dictionary"):
            for statement in needed:
                con.execute(statement)
