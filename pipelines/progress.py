"""Progress bars for the commands that drive Dagster runs (sync, backfill, demo)."""

import datetime as dt
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:  # dagster loads slowly; `redox-etl --help` should not wait for it
    from dagster import DagsterRun


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )


def sync_with_progress(console: Console, first: dt.date, last: dt.date) -> "DagsterRun":
    """One ``daily_sync`` run over [first, last], its steps shown as they finish."""
    from pipelines import runner

    with progress_bar(console) as bar:
        task = bar.add_task(f"sync {first}..{last}", total=None, status="")

        def update(done: int, total: int, current: str) -> None:
            bar.update(task, completed=done, total=total, status=current)

        return runner.sync(first, last, on_progress=update)
