"""`redox-etl load PATH...` (captured payload files into the lake) and `redox-etl coverage` (which
source JSON paths the lake's records carried and whether a column holds them).

Invariant: what is printed is counts, table names, record kinds and JSON paths, never a value or
a file name from the input (names may hold PHI; ``captured_files`` keeps them in the lake).
"""

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from resources import configured_warehouse, settings
from resources.landing import LandingZone

if TYPE_CHECKING:  # the loader imports dagster (assets/), which `redox-etl --help` should not wait for
    from pipelines.captured import LoadReport


def _console() -> Console:
    # Built per command, not at import: a table read by a log or a script (no terminal) is printed
    # wide enough that no cell is cut ("appointme…"), and COLUMNS is honoured when set.
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)


def load(
    paths: Annotated[
        list[Path], typer.Argument(help="Files or folders of captured payloads (JSON, NDJSON, .gz).")
    ],
    reload: Annotated[
        bool, typer.Option(help="Load files again even if their content hash was loaded before.")
    ] = False,
) -> None:
    """Load captured FHIR (bulk NDJSON, Bundles, resources) and Data Model messages into the lake."""
    console = _console()
    missing = [p for p in paths if not p.exists()]
    if missing:
        console.print(f"[red]{len(missing)} path(s) do not exist[/red]: check the arguments and run again.")
        raise typer.Exit(2)
    from pipelines.captured import load_paths  # dagster loads slowly: only when a load runs

    try:
        report = load_paths(configured_warehouse(), LandingZone(settings.lake_dir()), paths, reload=reload)
    except UnicodeDecodeError:
        console.print("[red]a file is not UTF-8 text (JSON must be)[/red]: convert it or leave it out.")
        raise typer.Exit(1) from None
    except OSError as error:
        # Files loaded before the failure are recorded; running the same command again skips them.
        console.print(
            f"[red]a file could not be read ({error.strerror or type(error).__name__})[/red]: "
            "fix its permissions or leave it out, then run the same command again."
        )
        raise typer.Exit(1) from None
    print_report(report)


def print_report(report: "LoadReport") -> None:
    console = _console()
    console.print(
        f"{report.files} file(s): {report.files - report.skipped_files} loaded, "
        f"{report.skipped_files} already loaded (same content) skipped; {report.documents} document(s)"
    )
    table = Table("table", "surface", "read", "loaded", "duplicates", "quarantined", "unmapped paths")
    for row in sorted(report.streams.values(), key=lambda r: (r.table, r.surface)):
        table.add_row(
            row.table,
            row.surface,
            str(row.read),
            str(row.loaded + row.known_references),
            str(row.duplicates),
            str(row.quarantined),
            str(row.unmapped_paths),
        )
    if report.streams:
        console.print(table)
    if report.unrouted:
        console.print(
            f"[yellow]{report.unrouted} document(s) of no known shape quarantined[/yellow]"
            " (quarantine, entity 'unrouted', with the reason)"
        )
    parts = [f"{r.table} {r.surface} {r.components}" for r in report.streams.values() if r.components]
    if parts:
        console.print(f"Component rows (parts of loaded records, e.g. blood pressure): {', '.join(parts)}")
    unresolved = [
        f"{r.table} {r.unresolved_references}" for r in report.streams.values() if r.unresolved_references
    ]
    if unresolved:
        console.print(
            "[yellow]References naming nothing their Bundle holds[/yellow] (urn:uuid, #contained,"
            f" Patient?identifier; a record's patient among them is quarantined): {', '.join(unresolved)}"
        )
    if report.other:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(report.other.items()))
        console.print(f"Records no table holds (counted, not loaded): {kinds}")
    if any(report.top_unmapped.values()):
        console.print("Most frequent unmapped paths: `redox-etl coverage` lists them all.")


def coverage(
    unmapped: Annotated[bool, typer.Option("--unmapped", help="Only paths no column holds.")] = False,
    entity: Annotated[str | None, typer.Option(help="Only this table (patients, encounters, ...).")] = None,
    limit: Annotated[int, typer.Option(help="Rows to print per surface and table.")] = 25,
) -> None:
    """Print field coverage: per surface, table and source JSON path, records that carried it and
    whether a column holds it (sums over every loaded partition)."""
    console = _console()
    warehouse = configured_warehouse()
    if warehouse.catalog_spec.exists() is False:
        console.print("[red]no lake yet[/red]: run `redox-etl sync` or `redox-etl load PATH` first.")
        raise typer.Exit(1)
    where, params = ["(? OR NOT mapped)"], [not unmapped]
    if entity:
        where.append("entity = ?")
        params.append(entity)  # type: ignore[arg-type]
    rows = warehouse.query(
        "SELECT surface, entity, path, sum(records)::BIGINT AS records, bool_and(mapped) AS mapped,"
        " row_number() OVER (PARTITION BY surface, entity ORDER BY sum(records) DESC, path) AS n"
        f" FROM field_coverage WHERE {' AND '.join(where)} GROUP BY surface, entity, path"
        " QUALIFY n <= ? ORDER BY surface, entity, records DESC, path",
        [*params, limit],
    )
    table = Table("surface", "table", "path", "records", "in a column")
    for row in rows.iter_rows(named=True):
        table.add_row(
            row["surface"], row["entity"], row["path"], str(row["records"]), "yes" if row["mapped"] else "no"
        )
    console.print(table)
    totals = warehouse.query(
        "SELECT count(DISTINCT (surface, entity, path)) FILTER (WHERE NOT mapped) AS unmapped,"
        " count(DISTINCT (surface, entity, path)) AS paths FROM field_coverage"
    ).row(0, named=True)
    console.print(
        f"{totals['paths']} path(s) seen, {totals['unmapped']} held by no column (reach them in source_pages)"
    )
