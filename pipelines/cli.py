"""The `redox-etl` command: one entry point whose sub-commands live beside the code they drive.

Each area exports a typer app and this module only mounts them, so adding a command never means
editing a shared file beyond one line here. The run commands (sync, backfill, doctor) live here.

Invariant: a command that cannot do its job says so in one screen and exits non-zero: a bad date or
range before anything starts, an unreachable or refusing target after the preflight
(pipelines/preflight.py) and before any run, a failed run by its steps' root causes (never a stack
trace, never the summary table). Nothing printed holds a secret or a patient value.
"""

import contextlib
import datetime as dt
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from pipelines import preflight
from pipelines.identity_cli import app as identity_app
from pipelines.load_cli import coverage as coverage_command
from pipelines.load_cli import load as load_command
from pipelines.progress import backfill_progress, sync_with_progress
from pipelines.signals import restore_interrupt
from pipelines.sql import sql as sql_command
from pipelines.webhook_cli import app as webhook_app
from resources import settings
from resources.settings import Settings, SettingsError
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
    # Started in the background (cron, nohup), SIGINT is ignored; Dagster would pass that on to
    # SIGTERM and to every process a run starts (pipelines/signals.py).
    restore_interrupt()
    # The sandbox's CLI imports nothing of ours; this is where it learns our state folder.
    ctx.obj = {"sandbox_state_dir": settings.sandbox_dir()}


app.command(name="sql")(sql_command)
app.add_typer(identity_app, name="identity")
app.command(name="load")(load_command)
app.command(name="coverage")(coverage_command)
app.add_typer(webhook_app, name="webhook")
console = Console(soft_wrap=True)  # one line per message in logs, never wrapped mid-word

Day = Annotated[str | None, typer.Option(help="First clinical day (YYYY-MM-DD, UTC).")]
EndDay = Annotated[str | None, typer.Option(help="Last clinical day (YYYY-MM-DD, UTC; default today).")]


def _fail(message: str, fix: str, *, code: int = 2) -> NoReturn:
    """One screen, no traceback: what is wrong, then what to do."""
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    console.print(f"What to do: {escape(fix)}", highlight=False)
    raise typer.Exit(code)


def _date(flag: str, text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        _fail(f"{flag} {text!r} is not a date ({exc})", f"give {flag} as YYYY-MM-DD, e.g. {flag} 2026-11-02")


def _days(start: str | None, end: str | None, days: int | None) -> tuple[dt.date, dt.date]:
    """The clinical days asked for, refused in one line when they cannot mean anything."""
    today = dt.datetime.now(dt.UTC).date()
    if days is not None and days < 1:
        _fail(f"--days {days}: the number of days to sync must be at least 1", "use --days 1 or more")
    last = _date("--end", end) if end else today
    first = _date("--start", start) if start else last - dt.timedelta(days=(days or 1) - 1)
    if first > last:
        _fail(f"--start {first} is after --end {last}", "give a --start on or before --end")
    if last > today:
        _fail(
            f"--end {last} is after today ({today}, UTC): Redox has no clinical days there yet",
            f"end the range on or before {today} (leave --end out for today)",
        )
    settings = Settings.from_env()
    if first < settings.start_date:
        _fail(
            f"--start {first} is before the first daily partition ({settings.start_date})",
            f"start on or after {settings.start_date}, or set REDOX_ETL_START_DATE earlier",
        )
    return first, last


def _check_source_range(first: dt.date, last: dt.date, target: preflight.Target) -> None:
    # Only the sandbox says which days it holds; real Redox is asked and answers with what it has.
    if target.first_day is None or target.last_day is None:
        return
    if last < target.first_day or first > target.last_day:
        _fail(
            f"{first}..{last} is outside the days the sandbox holds ({target.first_day}..{target.last_day})",
            f"choose days within {target.first_day}..{target.last_day}",
        )
    if first < target.first_day:
        console.print(
            f"[yellow]note:[/yellow] the sandbox holds no clinical days before {target.first_day}; "
            f"{first}..{target.first_day - dt.timedelta(days=1)} will load nothing."
        )


def _ready(first: dt.date, last: dt.date) -> None:
    """Start the sandbox if it is the target and down, then preflight; exit in one screen on failure."""
    settings = _settings()
    try:
        preflight.ensure_sandbox(console, settings)
    except (RuntimeError, TimeoutError, OSError) as exc:
        _fail(
            f"the sandbox could not start: {exc}",
            "run `.venv/bin/redox-etl sandbox serve` to see why",
            code=1,
        )
    _check_source_range(first, last, preflight.target(settings))
    checks = preflight.preflight(settings)
    if not all(c.ok for c in checks):
        console.print("[red]Preflight failed[/red]: nothing was run.")
        preflight.report(console, checks)
        raise typer.Exit(1)


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        _fail(str(exc), "fix the variable named above (.env.example lists each with its default)")


@app.command()
def doctor() -> None:
    """Check the target without running anything: reachable, token obtainable, both surfaces answer."""
    settings = _settings()
    if preflight.uses_sandbox(settings) and preflight.target(settings).first_day is None:
        console.print(
            "The target is the embedded sandbox and none is running: "
            "start it with `.venv/bin/redox-etl sandbox serve --background`."
        )
        raise typer.Exit(1)
    if not preflight.report(console, preflight.preflight(settings)):
        raise typer.Exit(1)
    console.print("All checks passed.")


@app.command()
def sync(
    start: Day = None,
    end: EndDay = None,
    days: Annotated[int | None, typer.Option(help="Days to sync, ending at --end (default 3).")] = None,
) -> None:
    """Pull the days from --start to --end from both Redox surfaces and load the warehouse, as one Dagster run."""
    if start and days is not None:
        _fail("--start and --days both given", "give either --start (with --end) or --days, not both")
    first, last = _days(start, end, 3 if days is None else days)
    _ready(first, last)
    from pipelines import runner, summary

    with _one_screen():
        run = sync_with_progress(console, first, last)
        _fail_unless_success(run)
        summary.print_summary(console, run_id=run.run_id)
        # Older days where Redox changed records since they were loaded (queued by redox_changes).
        for changed_first, changed_last in runner.pending_ranges():
            console.print(f"Redox changed records on {changed_first}..{changed_last} since they were loaded:")
            _fail_unless_success(sync_with_progress(console, changed_first, changed_last))


@contextlib.contextmanager
def _one_screen() -> Iterator[None]:
    """What the runner raises before or around a run (no partitions for the days, a daemon that
    died) ends the command in one screen; a run's own failures are reported by its steps."""
    try:
        yield
    except typer.Exit:  # click's Exit is a RuntimeError: a decided exit passes through
        raise
    except (RuntimeError, ValueError, OSError) as exc:
        log = settings.home() / "dagster-daemon.log"
        _fail(str(exc), f"see `make ui` for the runs' logs, and {log} for the daemon's", code=1)


def _fail_unless_success(run: "DagsterRun") -> None:
    if not run.is_success:
        from pipelines import summary

        summary.print_failure(console, run)
        raise typer.Exit(1)


@app.command()
def backfill(
    start: Annotated[str, typer.Option(help="First clinical day (YYYY-MM-DD).")],
    end: Annotated[str, typer.Option(help="Last clinical day (YYYY-MM-DD).")],
) -> None:
    """Backfill --start..--end as a Dagster backfill within the rate limit; rerun to resume."""
    first, last = _days(start, end, None)
    _ready(first, last)
    from pipelines import runner, summary

    with _one_screen(), backfill_progress(console, f"backfill {first}..{last}") as update:
        status, done, total = runner.backfill(first, last, on_progress=update)
    console.print(f"backfill {status.lower()}: {done}/{total} day(s) loaded")
    if done < total:
        summary.print_backfill_failures(console, first, last)
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
