"""The API audit trail (``api_calls``): every request a step made, stored once per (run_id, step).

Invariant: a retried step replaces its own rows in one transaction, so the trail never counts a
request twice; rows carry no request or response body, only what the schema's ``api_calls`` holds.
"""

import logging

import polars as pl

from resources.warehouse.checks import check_constant, check_frame
from resources.warehouse.connection import LAKE
from resources.warehouse.transaction import Writer, insert_all, registered, transaction, utcnow
from schema import API_CALLS, UTC_TS

log = logging.getLogger(__name__)


def append_api_calls(writer: Writer, frame: pl.DataFrame, *, run_id: str, step: str) -> int:
    """Store one step's API audit trail; a retry of the same (run_id, step) replaces its rows."""
    check_frame("api_calls", frame, API_CALLS)
    check_constant(frame, "run_id", run_id, "api_calls")
    staged = frame.with_columns(
        pl.lit(step, pl.String()).alias("step"),
        pl.lit(utcnow(), UTC_TS).alias("ingested_at"),
    )
    with (
        writer() as con,
        registered(con, "_incoming", staged),
        transaction(con, message=f"api_calls {step}", extra={"run_id": run_id}),
    ):
        con.execute(f"DELETE FROM {LAKE}.main.api_calls WHERE run_id = ? AND step = ?", [run_id, step])
        insert_all(con, "api_calls", staged.columns)
    log.info("api_calls step=%s: %d row(s)", step, staged.height)
    return staged.height
