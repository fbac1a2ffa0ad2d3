"""Refusing frames that break a lake table's contract, before anything is written.

Invariant: an error names tables, columns and dtypes, and at most the values of bookkeeping columns
(``source_surface``, ``entity``, ``run_id``); never a clinical value, so no PHI reaches a message.
"""

import polars as pl

from schema import QUARANTINE


def check_frame(table: str, frame: pl.DataFrame, schema: pl.Schema) -> None:
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


def check_constant(frame: pl.DataFrame, column: str, expected: str, table: str) -> None:
    """Refuse a frame in which some row's bookkeeping ``column`` is not ``expected``."""
    if frame.height and not frame.get_column(column).eq_missing(expected).all():
        found = frame.get_column(column).unique().sort(nulls_last=True).to_list()[:5]
        raise ValueError(f"{table}: every row's {column} must be {expected!r}, found {found}")


def check_quarantine(frame: pl.DataFrame, *, entity: str, source_surface: str) -> None:
    check_frame("quarantine", frame, QUARANTINE)
    check_constant(frame, "entity", entity, "quarantine")
    check_constant(frame, "source_surface", source_surface, "quarantine")
