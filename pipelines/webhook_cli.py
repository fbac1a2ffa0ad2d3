"""`redox-etl webhook ...`: run the destination endpoint, load, replay and inspect the push lane's inbox.

Mounted by pipelines/cli.py (``app.add_typer(webhook_app, name="webhook")``); also runnable alone as
``python -m pipelines.webhook_cli``. Every command prints counts and times, never a body or a token;
a configuration problem is one line saying what to set.
"""

import datetime as dt
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from resources.inbox import Inbox
from resources.settings import Settings, SettingsError

if TYPE_CHECKING:
    from dagster import JobDefinition

app = typer.Typer(
    help="The push lane: receive Redox's webhook deliveries, load and replay them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold tokens or patient data
)
console = Console()
CLI_TAG = "redox-etl/webhook-cli"
PID_TAG = "redox-etl/pid"

InboxPath = Annotated[
    Path | None,
    typer.Option(help="Inbox file (default: REDOX_WEBHOOK_INBOX or $REDOX_ETL_HOME/inbox/inbox.sqlite)."),
]


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None


def _when(text: str | None, name: str) -> dt.datetime | None:
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{name} is an ISO 8601 date or time, e.g. 2026-12-01 or 2026-12-01T08:00Z"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Interface to bind (0.0.0.0 behind a TLS-terminating proxy).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8787,
    ssl_certfile: Annotated[str | None, typer.Option(help="PEM certificate: serve HTTPS directly.")] = None,
    ssl_keyfile: Annotated[str | None, typer.Option(help="PEM private key for --ssl-certfile.")] = None,
    inbox: InboxPath = None,
) -> None:
    """Run the destination endpoint: verify, check tokens, store each delivery durably, answer 200."""
    from pipelines.webhook import TokenError, receiver_from_settings
    from pipelines.webhook import serve as run_server

    settings = _settings()
    try:
        receiver = receiver_from_settings(settings, inbox=inbox)
    except (TokenError, OSError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise typer.BadParameter("--ssl-certfile and --ssl-keyfile go together")
    run_server(
        receiver,
        host=host,
        port=port,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        announce=lambda line: typer.echo(line),
    )


def _push_load_job() -> "JobDefinition":
    # Dagster loads slowly; only `webhook load` needs the code location.
    from pipelines.definitions import defs

    return defs.resolve_job_def("push_load")


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@app.command()
def load() -> None:
    """Load what arrived since the last load now, as one Dagster run (the sensor push_inbox does this
    every REDOX_WEBHOOK_LOAD_INTERVAL seconds under the daemon)."""
    import dagster as dg
    from dagster import DagsterRunStatus, RunsFilter

    from pipelines import runner

    inst = runner.instance()
    # A load command killed mid-run leaves its run STARTED and the `warehouse` slot held; with a limit
    # of 1 every later load would wait on it. Only runs of a load command whose process is gone.
    for run in inst.get_runs(
        RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING], tags={CLI_TAG: "load"})
    ):
        if not _pid_alive(run.tags.get(PID_TAG, "")):
            inst.report_run_failed(run, message="its `redox-etl webhook load` process is gone")
            inst.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    tags = {"redox-etl/kind": "push", CLI_TAG: "load", PID_TAG: str(os.getpid())}
    # The step's events stay in the instance (`make ui`); the console shows what went wrong.
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    with dg.execute_job(
        dg.reconstructable(_push_load_job), instance=inst, tags=tags, run_config=quiet
    ) as done:
        ok = done.success
        events = done.get_asset_materialization_events()
    for event in events:
        metadata = event.materialization.metadata
        console.print(" ".join(f"{k}={v.value}" for k, v in metadata.items()))
    if not ok:
        console.print("[red]the push load failed[/red]: open `make ui` for its logs")
        raise typer.Exit(1)


@app.command()
def replay(
    since: Annotated[
        str | None, typer.Option(help="First arrival time (ISO 8601, UTC when no offset).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Arrivals before this time (ISO 8601).")] = None,
    inbox: InboxPath = None,
) -> None:
    """Normalize stored deliveries again (after a mapping fix), quarantined ones included."""
    from assets.push import replay as replay_deliveries
    from resources import configured_warehouse

    settings = _settings()
    store = Inbox(inbox or settings.inbox_file)
    run_id = f"webhook-replay-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
    tally = replay_deliveries(
        configured_warehouse(settings),
        store,
        since=_when(since, "--since"),
        until=_when(until, "--until"),
        run_id=run_id,
    )
    metadata = tally.metadata()
    console.print(" ".join(f"{k}={v}" for k, v in metadata.items()))


@app.command()
def status(
    inbox: InboxPath = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Inbox depth, last delivery, rejected deliveries and the last load's lag."""
    settings = _settings()
    path = inbox or settings.inbox_file
    if not path.exists():
        console.print(f"no inbox at {path} yet: start `redox-etl webhook serve`")
        raise typer.Exit(1)
    facts = Inbox(path).status()
    if as_json:
        typer.echo(json.dumps(facts, default=str))
        return
    table = Table(title="Webhook inbox", show_header=False)
    for name, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        table.add_row(name.replace("_", " "), "-" if value is None else str(value))
    console.print(table)


if __name__ == "__main__":
    app()
