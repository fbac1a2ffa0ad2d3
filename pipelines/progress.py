"""Progress for the commands that drive Dagster runs (sync, backfill, demo), on a terminal or not.

On a terminal: a Rich bar. Without one (cron, CI, a pipe): one plain line per finished step or day,
with its counts (requests, pages, records loaded, quarantined) and the share of the rate budget's
window spent so far, so the log of a killed or hung run shows where it was; and the start-up time
before the first step began. Every line is counts and step names only: no patient value.
"""

import contextlib
import datetime as dt
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from resources import configured_warehouse
from resources.redox.settings import RateSpec
from resources.settings import Settings

if TYPE_CHECKING:  # dagster loads slowly; `redox-etl --help` should not wait for it
    from dagster import DagsterInstance, DagsterRun

Update = Callable[[int, int, str], None]
# Materialization metadata worth a plain line, in the order shown.
COUNTS = ("requests", "pages", "entries", "loaded", "duplicates", "quarantined")


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _window_limit() -> int:
    return RateSpec.parse(Settings.from_env().rate_limit).limit


class PlainSteps:
    """Prints each newly finished step of the run tagged ``range_tag`` once, with its counts."""

    def __init__(self, console: Console, label: str, range_tag: str) -> None:
        self.console = console
        self.label = label
        self.range_tag = range_tag
        self.began = time.monotonic()
        self.seen: set[str] = set()
        self.requests = 0
        self.started = False
        self.limit = _window_limit()
        self._instance: DagsterInstance | None = None

    def _say(self, text: str) -> None:
        self.console.print(
            f"[{time.monotonic() - self.began:6.1f}s] {self.label}: {text}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    def __call__(self, done: int, total: int, current: str) -> None:
        from pipelines import runner

        if self._instance is None:
            self._instance = runner.instance()
        inst = self._instance
        run = _run_tagged(inst, self.range_tag)
        if run is None:
            return
        if not self.started and current not in ("", "starting"):
            self.started = True
            self._say(f"first step began after {time.monotonic() - self.began:.1f} s of start-up")
        for step, counts in _finished_steps(inst, run.run_id):
            if step in self.seen:
                continue
            self.seen.add(step)
            self.requests += counts.get("requests", 0)
            shown = ", ".join(f"{k} {counts[k]:,}" for k in COUNTS if counts.get(k))
            self._say(
                f"{len(self.seen)}/{total} steps, {step} done"
                + (f" ({shown})" if shown else "")
                + f"; requests so far {self.requests:,} = {self.requests / self.limit:.1%} of the rate window"
            )


def _run_tagged(inst: "DagsterInstance", range_tag: str) -> "DagsterRun | None":
    from dagster._core.storage.dagster_run import RunsFilter

    from pipelines import runner

    runs = inst.get_runs(RunsFilter(tags={runner.RANGE_TAG: range_tag}), limit=1)
    return runs[0] if runs else None


def _finished_steps(inst: "DagsterInstance", run_id: str) -> list[tuple[str, dict[str, int]]]:
    """(step key, integer counts from its materializations) for every step that succeeded."""
    import dagster as dg

    counts: dict[str, dict[str, int]] = {}
    for record in inst.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records:
        materialization = record.event_log_entry.asset_materialization
        step = record.event_log_entry.step_key or ""
        if materialization is None:
            continue
        into = counts.setdefault(step, {})
        for key, value in materialization.metadata.items():
            number = getattr(value, "value", None)
            if isinstance(number, int) and not isinstance(number, bool):
                into[key] = into.get(key, 0) + number
    done = inst.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS).records
    return [
        (r.event_log_entry.step_key or "", counts.get(r.event_log_entry.step_key or "", {})) for r in done
    ]


def _requests_since(since: dt.datetime) -> int | None:
    """Requests the audit trail recorded since ``since`` (every process's, on this lake); None before
    the lake exists. Extract steps append their audit as they finish, so this lags by a step."""
    try:
        frame = configured_warehouse().query(
            "SELECT count(*) AS n FROM api_calls WHERE called_at >= ?", [since]
        )
    except Exception:  # no lake yet, or the catalog busy: the line goes out without the figure
        return None
    return int(frame["n"][0])


def sync_with_progress(console: Console, first: dt.date, last: dt.date) -> "DagsterRun":
    """One ``daily_sync`` run over [first, last], its steps shown as they finish."""
    from pipelines import runner

    label = f"sync {first}..{last}"
    if not console.is_terminal:
        plain = PlainSteps(console, label, f"{first}..{last}")
        plain._say("starting (Dagster run in this process)")
        run = runner.sync(first, last, on_progress=plain)
        plain(0, len(plain.seen), "done")
        plain._say(f"run {run.status.value.lower()} after {time.monotonic() - plain.began:.1f} s")
        return run
    with progress_bar(console) as bar:
        task = bar.add_task(label, total=None, status="")

        def update(done: int, total: int, current: str) -> None:
            bar.update(task, completed=done, total=total, status=current)

        return runner.sync(first, last, on_progress=update)


@contextlib.contextmanager
def backfill_progress(console: Console, label: str) -> Iterator[Update]:
    """An ``on_progress`` for ``runner.backfill``: a bar, or one plain line per change of days done."""
    if console.is_terminal:
        with progress_bar(console) as bar:
            task = bar.add_task(label, total=None, status="")

            def update(done: int, total: int, current: str) -> None:
                bar.update(task, completed=done, total=total, status=current)

            yield update
        return
    began = time.monotonic()
    since = dt.datetime.now(dt.UTC)
    limit = _window_limit()
    last: dict[str, Any] = {"done": -1, "status": ""}

    def plain(done: int, total: int, current: str) -> None:
        if (done, current) == (last["done"], last["status"]):
            return
        if last["done"] < 0:
            console.print(
                f"[{time.monotonic() - began:6.1f}s] {label}: daemon up and backfill submitted "
                f"({time.monotonic() - began:.1f} s of start-up)",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        last.update(done=done, status=current)
        spent = _requests_since(since)
        budget = (
            "" if spent is None else f"; requests so far {spent:,} = {spent / limit:.1%} of the rate window"
        )
        console.print(
            f"[{time.monotonic() - began:6.1f}s] {label}: {done}/{total} day(s) loaded ({current}){budget}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    console.print(
        f"[{0.0:6.1f}s] {label}: starting the Dagster daemon", markup=False, highlight=False, soft_wrap=True
    )
    yield plain
