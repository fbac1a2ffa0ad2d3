"""Tables and views computed from the lake rather than loaded into it (identity links, views).

Invariant: one call is ONE transaction, so a reader never sees one derived table from this run
beside another from the last; the loaded tables (``lake_schemas()``) are refused here, they have
their own loads.
"""

import contextlib
import logging
from collections.abc import Mapping

import polars as pl

from resources.warehouse import comments
from resources.warehouse.connection import LAKE
from resources.warehouse.ddl import columns_sql, quote_ident
from resources.warehouse.migrate import lake_schemas
from resources.warehouse.transaction import Writer, current_snapshot, registered, transaction

log = logging.getLogger(__name__)


def write_derived(
    writer: Writer,
    *,
    run_id: str,
    message: str,
    replace: Mapping[str, pl.DataFrame] | None = None,
    append: Mapping[str, pl.DataFrame] | None = None,
    views: Mapping[str, str] | None = None,
) -> int | None:
    """Write derived tables and views as one snapshot and return its id (see ``Warehouse.write_derived``)."""
    replace, append, views = dict(replace or {}), dict(append or {}), dict(views or {})
    names = [*replace, *append, *views]
    loaded = lake_schemas()
    for name in names:
        if name in loaded:
            raise ValueError(f"{name!r} is a loaded table; use merge/append_api_calls/... instead")
        if not name.isidentifier():
            raise ValueError(f"table or view name {name!r} must be a plain identifier")
    if len(set(names)) != len(names):
        raise ValueError("a name may appear once among replace, append and views")
    with contextlib.ExitStack() as stack:
        con = stack.enter_context(writer())
        staged = {}
        for i, (name, frame) in enumerate([*replace.items(), *append.items()]):
            staged[name] = f"_derived_{i}"
            stack.enter_context(registered(con, staged[name], frame))
        with transaction(con, message=message, extra={"run_id": run_id}):
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
            # Replacing drops comments: put the dictionary's back in the same snapshot.
            for statement in comments.statements(con, names):
                con.execute(statement)
        snapshot = current_snapshot(con)
    log.info(
        "derived write %r: replaced %s, appended %s, views %s, snapshot=%s",
        message,
        {n: f.height for n, f in replace.items()},
        {n: f.height for n, f in append.items()},
        sorted(views),
        snapshot,
    )
    return snapshot
