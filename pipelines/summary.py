"""The end-of-run summary: rows per table and surface, requests spent, budget used, quarantined.

Counts only: nothing here reads a patient field, so the summary is safe to print and to paste.
"""

from rich.console import Console
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
