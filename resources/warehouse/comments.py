"""Comments on the lake's tables, views and columns, from ``schema.descriptions`` (the data dictionary).

``statements(con)`` says which ``COMMENT ON`` statements would bring the lake's comments in line;
callers run them inside the transaction that created or replaced the objects, because DuckLake
drops an object's comments when it is replaced (``CREATE OR REPLACE``).

Invariant: a statement is produced only where the lake's comment differs from the description, so
an up-to-date lake costs one catalog read and writes no snapshot. Only objects in the lake get one;
views get a table-level comment only (DuckDB has no comments on a view's columns).
"""

from collections.abc import Collection

import duckdb

from resources.warehouse.connection import LAKE
from resources.warehouse.ddl import quote_ident
from schema.descriptions import COLUMN_DESCRIPTIONS, TABLE_DESCRIPTIONS


def statements(con: duckdb.DuckDBPyConnection, names: Collection[str] | None = None) -> list[str]:
    """The COMMENT statements the lake needs, for ``names`` (default: every described object)."""
    wanted = set(TABLE_DESCRIPTIONS) | set(COLUMN_DESCRIPTIONS)
    if names is not None:
        wanted &= set(names)
    if not wanted:
        return []
    objects = con.execute(
        "SELECT table_name, 'TABLE', comment FROM duckdb_tables() WHERE database_name = $db "
        "AND schema_name = 'main' UNION ALL SELECT view_name, 'VIEW', comment FROM duckdb_views() "
        "WHERE database_name = $db AND schema_name = 'main' AND NOT internal",
        {"db": LAKE},
    ).fetchall()
    kinds = {name: (kind, comment) for name, kind, comment in objects if name in wanted}
    column_rows = con.execute(
        "SELECT table_name, column_name, comment FROM duckdb_columns() "
        "WHERE database_name = $db AND schema_name = 'main'",
        {"db": LAKE},
    ).fetchall()
    have = {(table, column): comment for table, column, comment in column_rows if table in kinds}
    out: list[str] = []
    for name, (kind, comment) in sorted(kinds.items()):
        target = f"{LAKE}.main.{quote_ident(name)}"
        text = TABLE_DESCRIPTIONS.get(name)
        if text is not None and comment != text:
            out.append(f"COMMENT ON {kind} {target} IS {_literal(text)}")
        if kind != "TABLE":
            continue
        for column, meaning in COLUMN_DESCRIPTIONS.get(name, {}).items():
            if (name, column) in have and have[(name, column)] != meaning:
                out.append(f"COMMENT ON COLUMN {target}.{quote_ident(column)} IS {_literal(meaning)}")
    return out


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
