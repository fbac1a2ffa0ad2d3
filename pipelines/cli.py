"""The `redox-etl` command: one entry point whose sub-commands live beside the code they drive.

Each area exports a typer app and this module only mounts them, so adding a command never means
editing a shared file beyond one line here.
"""

import datetime as dt
import warnings
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from pipelines.identity_cli import app as identity_app
from pipelines.progress import progress_bar, sync_with_progress
from pipelines.sql import sql as sql_command
from resources import settings
from sandbox.cli import app as sandbox_app

if TYPE_CHECKING:  # dagster loads slowly; `redox-etl --help` should not wait for it
    from dagster import DagsterRun

# Dagster marks BackfillPolicy as beta and says so on every import: noise for a command's user.
warnings.filterwarnings("ignore", message=r".*is currently in beta.*")

app = typer.Typer(
    name="redox-etl",
    help="Clinical data from Redox (FHIR R4 + Data Model APIs) into a DuckLake warehouse.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold tokens or patient data
)
app.add_typer(sandbox_app, name="sandbox")


@app.callback()
def _main(ctx: typer.Context) -> None:
    # The sandbox's CLI imports nothing of ours; this is where it learns our state folder.
    ctx.obj = {"sandbox_state_dir": settings.sandbox_dir()}


app.command(name="sql")(sql_command)
app.add_typer(identity_app, name="identity")
console = Console()

Day = Annotated[str | None, typer.Option(help="First clinical day (YYYY-MM-DD, UTC).")]


def _days(start: str | None, end: str | None, default_days: int) -> tuple[dt.date, dt.date]:
    last = dt.date.fromisoformat(end) if end else dt.datetime.now(dt.UTC).date()
    first = dt.date.fromisoformat(start) if start else last - dt.timedelta(days=default_days - 1)
    if first > last:
        raise typer.BadParameter(f"--start {first} is after --end {last}")
    return first, last


@app.command()
def sync(
    start: Day = None,
    end: Annotated[str | None, typer.Option(help="Last clinical day (default today, UTC).")] = None,
    days: Annotated[int, typer.Option(help="Days to sync when --start is not given.")] = 3,
) -> None:
    """Pull the days from --start to --end from both Redox surfaces and load the warehouse, as one Dagster run."""
    from pipelines import runner, summary

    first, last = _days(start, end, days)
    run = sync_with_progress(console, first, last)
    summary.print_summary(console, run_id=run.run_id)
    _fail_unless_success(run)
    # Older days where Redox changed records since they were loaded (queued by redox_changes).
    for changed_first, changed_last in runner.pending_ranges():
        console.print(f"Redox changed records on {changed_first}..{changed_last} since they were loaded:")
        _fail_unless_success(sync_with_progress(console, changed_first, changed_last))


def _fail_unless_success(run: "DagsterRun") -> None:
    if not run.is_success:
        console.print(f"[red]run {run.run_id} ended {run.status.value}[/red]: open `make ui` for its logs")
        raise typer.Exit(1)


@app.command()
def backfill(
    start: Annotated[str, typer.Option(help="First clinical day (YYYY-MM-DD).")],
    end: Annotated[str, typer.Option(help="Last clinical day (YYYY-MM-DD).")],
) -> None:
    """Backfill --start..--end as a Dagster backfill within the rate limit; rerun to resume."""
    from pipelines import runner

    first, last = _days(start, end, 1)
    with progress_bar(console) as bar:
        task = bar.add_task(f"backfill {first}..{last}", total=None, status="")

        def update(done: int, total: int, current: str) -> None:
            bar.update(task, completed=done, total=total, status=current)

        status, done, total = runner.backfill(first, last, on_progress=update)
    console.print(f"backfill {status.lower()}: {done}/{total} day(s) loaded")
    if done < total:
        console.print("Run the same command again to resume: finished days are not fetched again.")
        raise typer.Exit(1)


@app.command()
def demo(
    days: Annotated[int, typer.Option(help="Recent days to sync.")] = 21,
    patients: Annotated[int, typer.Option(help="Sandbox population size.")] = 1000,
) -> None:
    """Start the embedded sandbox, sync its recent weeks, and show what analysts can ask."""
    from pipelines.demo import run_demo

    run_demo(console, days=days, patients=patients)


if __name__ == "__main__":
    app()
