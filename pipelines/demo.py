"""`make demo`: the embedded sandbox, a real sync of its recent weeks, and two analyst questions.

Runs against the sandbox unless REDOX_BASE_URL points at a real Redox, in which case the sandbox
is not started. The sandbox is started in the background and left running (`redox-etl sandbox
stop` ends it), so the README's next commands sync from it. The sync is a real Dagster run on the
persistent instance, so `make ui` shows it. A failed run prints its root causes, not the summary.
"""

import datetime as dt
import time

from rich.console import Console
from rich.table import Table

from pipelines import preflight, summary
from pipelines.progress import sync_with_progress
from resources import configured_warehouse, settings
from resources.settings import Settings

QUESTIONS = {
    "Encounters per class and surface in the synced weeks": (
        "SELECT class, source_surface, count(*) AS encounters FROM encounters GROUP BY ALL ORDER BY 1, 2"
    ),
    "Abnormal lab results by test (top 5)": (
        "SELECT display AS test, count(*) FILTER (WHERE abnormal_flag <> 'normal') AS abnormal, "
        "count(*) AS results FROM results GROUP BY ALL ORDER BY abnormal DESC LIMIT 5"
    ),
}


def run_demo(console: Console, *, days: int, patients: int) -> None:
    end = dt.datetime.now(dt.UTC).date()
    start = end - dt.timedelta(days=days - 1)
    config = Settings.from_env()
    if config.base_url:
        console.print("REDOX_BASE_URL is set: syncing from it instead of the sandbox.")
    else:
        settings.sandbox_dir()  # the state folder, created owner-only
        record = preflight.ensure_sandbox(console, config, patients=patients)
        if record is not None:
            console.print(
                f"Sandbox at {record['base_url']} ({record['patients']:,} patients), left running for "
                "the next commands; `.venv/bin/redox-etl sandbox stop` ends it."
            )
    checks = preflight.preflight(config)
    if not all(c.ok for c in checks):
        console.print("[red]Preflight failed[/red]: nothing was run.")
        preflight.report(console, checks)
        raise SystemExit(1)
    _sync_and_show(console, start, end)


def _sync_and_show(console: Console, start: dt.date, end: dt.date) -> None:
    began = time.monotonic()
    console.print(f"Syncing {start} .. {end} from both Redox surfaces through Dagster...")
    run = sync_with_progress(console, start, end)
    console.print(f"Run {run.run_id} {run.status.value.lower()} in {time.monotonic() - began:.0f} s")
    if not run.is_success:
        summary.print_failure(console, run)
        raise SystemExit(1)
    summary.print_summary(console, run_id=run.run_id)
    warehouse = configured_warehouse()
    for title, sql in QUESTIONS.items():
        frame = warehouse.query(sql)
        table = Table(title=f"{title}\n[dim]{sql}[/dim]")
        for column in frame.columns:
            table.add_column(column)
        for row in frame.rows():
            table.add_row(*[str(v) for v in row])
        console.print(table)
    console.print(
        'Ask your own: `.venv/bin/redox-etl sql "select count(*) from patients"`. '
        "See the runs and assets: `make ui`, then open http://127.0.0.1:3000.",
        highlight=False,
    )
