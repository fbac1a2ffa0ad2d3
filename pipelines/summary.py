"""The end-of-run summary: rows per table and surface, requests spent, budget used, quarantined.

Counts only: nothing here reads a patient field, so the summary is safe to print and to paste.
After a failed run it prints the failing steps' root causes instead (the client's errors, which
carry Redox's words and never PHI), not Dagster's stack traces, which stay in the run's logs.
"""

import datetime as dt
from typing import Any

import dagster as dg
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from resources import configured_warehouse
from resources.redox.settings import RateSpec
from resources.settings import Settings

TABLES = ("patients", "encounters", "results", "appointments")


def print_summary(console: Console, *, run_id: str | None = None) -> None:
    settings = Settings.from_env()
    warehouse = configured_warehouse(settings)
    table = Table(title="Warehouse after sync", show_lines=False)
    for column in ("table", "surface", "rows", "quarantined"):
        table.add_column(column, justify="right" if column in ("rows", "quarantined") else "left")
    quarantined = {
        (r[0], r[1]): r[2]
        for r in warehouse.query(
            "SELECT entity, source_surface, count(*) FROM quarantine GROUP BY ALL"
        ).rows()
    }
    for name in TABLES:
        rows = warehouse.query(f"SELECT source_surface, count(*) FROM {name} GROUP BY ALL ORDER BY 1").rows()
        for surface, count in rows:
            table.add_row(name, surface, f"{count:,}", f"{quarantined.get((name, surface), 0):,}")
    console.print(table)
    present = set(warehouse.query("SELECT table_name FROM duckdb_tables()")["table_name"].to_list())
    if {"person_crosswalk", "identity_review"} <= present:
        records, persons, linked = warehouse.query(
            "SELECT count(*), count(DISTINCT person_key), count(*) FILTER (WHERE method <> 'singleton')"
            " FROM person_crosswalk"
        ).row(0)
        review = warehouse.query("SELECT count(*) FROM identity_review").item()
        console.print(
            f"Identity: {records:,} patient records are {persons:,} persons "
            f"({linked:,} records linked across surfaces, {review:,} pair(s) waiting in identity_review)."
        )
    if run_id:
        calls = warehouse.query(
            "SELECT count(*) AS requests, count(*) FILTER (WHERE status = 429) AS refused, "
            "count(*) FILTER (WHERE attempt > 1) AS retries FROM api_calls WHERE run_id = ?",
            [run_id],
        ).row(0)
        limit = RateSpec.parse(settings.rate_limit)
        console.print(
            f"Requests spent: {calls[0]:,} ({calls[2]:,} retries, {calls[1]:,} refused with 429); "
            f"budget: {limit.limit:,} per {limit.seconds:g} s, so this run used "
            f"{calls[0] / limit.limit:.1%} of one window."
        )


# ---- when a run failed ---------------------------------------------------------------------------

# Dagster wraps a step's exception in its own ("Error occurred while executing op ..."); the user
# needs the innermost cause, whose message is the client's error: endpoint, Redox's words, the fix.
_WRAPPERS = ("DagsterExecutionStepExecutionError", "DagsterUserCodeExecutionError")


def root_cause(error: Any) -> str:
    """``ClassName: message`` of the innermost cause of a SerializableErrorInfo, one paragraph."""
    seen = error
    while getattr(seen, "cause", None) is not None:
        seen = seen.cause
    if seen.cls_name in _WRAPPERS and getattr(seen, "context", None) is not None:
        seen = seen.context
    message = " ".join(str(seen.message).split())
    return message if message.startswith(f"{seen.cls_name}:") else f"{seen.cls_name}: {message}"


def failed_steps(run_id: str) -> list[tuple[str, str]]:
    """(step key, root cause) for each failed step of the run; the run's own failure if none."""
    from pipelines import runner

    inst = runner.instance()
    out: list[tuple[str, str]] = []
    for record in inst.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records:
        event = record.event_log_entry.dagster_event
        data = event.step_failure_data if event is not None else None
        error = data.error if data is not None else None
        out.append(
            (record.event_log_entry.step_key or "?", root_cause(error) if error else "no error recorded")
        )
    if not out:
        for record in inst.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records:
            out.append(("run", " ".join(record.event_log_entry.message.split())))
    return out


def print_failure(console: Console, run: "dg.DagsterRun") -> None:
    """The failed steps and their root causes, then where the full logs are: never a stack trace."""
    console.print(f"[red]Run {run.run_id} {run.status.value.lower()}[/red]; nothing below is a success.")
    causes = failed_steps(run.run_id)
    # Many steps often fail for one reason (a dead host fails every extract): say each reason once.
    by_cause: dict[str, list[str]] = {}
    for step, cause in causes:
        by_cause.setdefault(cause, []).append(step)
    for cause, steps in by_cause.items():
        named = ", ".join(steps[:4]) + (f" and {len(steps) - 4} more" if len(steps) > 4 else "")
        console.print(f"  {escape(named)}: {escape(cause)}", highlight=False)
    console.print(
        f"Full logs and stack traces: `make ui`, then open http://127.0.0.1:3000/runs/{run.run_id}",
        highlight=False,
    )


def print_backfill_failures(console: Console, first: "dt.date", last: "dt.date") -> None:
    """Root causes of the failed runs of the backfill over [first, last]."""
    from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter

    from pipelines import runner

    inst = runner.instance()
    runs = inst.get_runs(
        RunsFilter(
            statuses=[DagsterRunStatus.FAILURE], tags={runner.BACKFILL_KIND[0]: runner.BACKFILL_KIND[1]}
        ),
        limit=20,
    )
    window = (first.isoformat(), last.isoformat())
    mine = [r for r in runs if window[0] <= (r.tags.get("dagster/partition") or "") <= window[1]]
    for run in mine[:5]:
        print_failure(console, run)
