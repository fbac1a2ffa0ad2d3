"""Running the pipeline through a persistent Dagster instance: syncs and resumable backfills.

Both go through the instance in ``DAGSTER_HOME`` (default ``$REDOX_ETL_HOME/dagster``, see
pipelines/instance.py), so pools, run history and the UI (`make ui`) see the same runs, and the
shared rate budget applies to all.

Invariants:
- a queued pending day is re-pulled by one process at a time: ``pending_ranges`` claims the days it
  returns (a ``flock`` per day beside the lake, held until ``release_claims`` or the process ends,
  dropped by the kernel even on SIGKILL) and leaves days another process holds to that process;
- a backfill is a real Dagster backfill executed by ``dagster-daemon``; the daemon lives only as long
  as the command (it dies with it), so a killed command leaves no stray workers;
- resuming never re-loads a partition that is already materialized: it marks the runs the killed
  daemon orphaned as failed and backfills only the partitions still missing.
"""

import contextlib
import ctypes
import datetime as dt
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import filelock
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES, DagsterRunStatus, RunsFilter
from dagster._core.storage.tags import BACKFILL_ID_TAG
from dagster._core.utils import make_new_backfill_id

from assets.extract import EXTRACT_OP
from assets.partitions import ranges
from pipelines import instance as project_instance
from pipelines.definitions import defs
from resources import settings
from resources.warehouse import LakeNotFoundError, Warehouse
from transforms.streams import ENTITIES

ROOT = Path(__file__).resolve().parent.parent
RANGE_TAG = "redox-etl/range"
# Beside the lake, where the writer lock also lives: one lock file per claimed pending day.
CLAIMS = ".pending-claims"
BACKFILL_KIND = ("redox-etl/kind", "backfill")
Progress = Callable[[int, int, str], None]


def instance() -> dg.DagsterInstance:
    """The persistent instance, with this project's dagster.yaml (pool limits) in place."""
    return project_instance.get()


def _daily_sync_job() -> dg.JobDefinition:
    return defs.resolve_job_def("daily_sync")


def partition_keys(start: dt.date, end: dt.date) -> list[str]:
    """The daily_sync job's partition keys in [start, end]: the same definition the assets use."""
    daily = _daily_sync_job().partitions_def
    assert isinstance(daily, dg.TimeWindowPartitionsDefinition)
    keys = daily.get_partition_keys()
    chosen = [k for k in keys if start.isoformat() <= k <= end.isoformat()]
    if not chosen:
        raise ValueError(
            f"no daily partitions between {start} and {end}: partitions start at {daily.start.date()} "
            "(set REDOX_ETL_START_DATE to reach further back) and end today"
        )
    return chosen


def sync(
    start: dt.date,
    end: dt.date,
    *,
    refetch: bool = True,
    on_progress: Progress | None = None,
) -> dg.DagsterRun:
    """One run of ``daily_sync`` over [start, end], executed in this process; returns the run."""
    inst = instance()
    keys = partition_keys(start, end)
    job = dg.reconstructable(_daily_sync_job)
    tags = {
        "dagster/asset_partition_range_start": keys[0],
        "dagster/asset_partition_range_end": keys[-1],
        RANGE_TAG: f"{keys[0]}..{keys[-1]}",
    }
    run_config = {
        "ops": {EXTRACT_OP: {"config": {"refetch": refetch}}},
        # The command shows progress, then a summary or the failed steps' root causes; every event,
        # stack traces included, stays in the instance (`make ui`), so the console shows none.
        "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
    }
    result: dict[str, dg.DagsterRun] = {}

    def execute() -> None:
        with dg.execute_job(job, instance=inst, tags=tags, run_config=run_config) as done:
            result["run"] = inst.get_run_by_id(done.run_id)  # type: ignore[assignment]

    worker = threading.Thread(target=execute, name="redox-etl-sync", daemon=True)
    worker.start()
    total = len(_daily_sync_job().nodes)
    while worker.is_alive():
        worker.join(0.5)
        if on_progress:
            done_steps, current = _step_progress(inst, tags[RANGE_TAG])
            on_progress(done_steps, total, current)
    if "run" not in result:
        raise RuntimeError("the sync run did not start; see the log above for the reason")
    if on_progress:
        on_progress(total, total, "done")
    return result["run"]


def pending_ranges() -> list[tuple[dt.date, dt.date]]:
    """Runs of consecutive days the changes asset queued, no load has cleared yet, and this process
    has claimed: days another process is re-pulling are left to it (see ``claim``)."""
    try:
        warehouse = Warehouse()
        queued = sorted(set(warehouse.pending_partitions()["partition_day"].to_list()))
    except LakeNotFoundError:
        return []
    claimed = [day for day in queued if claim(day)]
    if not claimed:
        return []
    # A day claimed only after its holder finished has been re-pulled and cleared: not again.
    still = set(warehouse.pending_partitions()["partition_day"].to_list())
    return ranges([day for day in claimed if day in still])


_claims: dict[dt.date, filelock.BaseFileLock] = {}


def claim(day: dt.date) -> bool:
    """Claim the re-pull of a queued day for this process; False when another process holds it."""
    if day in _claims:
        return True
    folder = settings.lake_dir() / CLAIMS
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = filelock.FileLock(folder / f"{day.isoformat()}.lock", mode=0o600, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        return False
    _claims[day] = lock
    return True


def release_claims() -> None:
    """Give up every claim this process holds (they also go when it exits)."""
    while _claims:
        _claims.popitem()[1].release()


def _step_progress(inst: dg.DagsterInstance, range_tag: str) -> tuple[int, str]:
    runs = inst.get_runs(RunsFilter(tags={RANGE_TAG: range_tag}), limit=1)
    if not runs:
        return 0, "starting"
    records = inst.get_records_for_run(runs[0].run_id, of_type=dg.DagsterEventType.STEP_SUCCESS).records
    started = inst.get_records_for_run(runs[0].run_id, of_type=dg.DagsterEventType.STEP_START).records
    current = started[-1].event_log_entry.step_key or "" if started else "starting"
    return len(records), current


# ---- backfills -----------------------------------------------------------------------------------


def missing_partitions(inst: dg.DagsterInstance, keys: list[str]) -> list[str]:
    """Keys not yet materialized for every load asset: what a backfill still has to do."""
    done = set(keys)
    for entity in ENTITIES:
        materialized = inst.get_materialized_partitions(dg.AssetKey(entity))
        done &= set(materialized)
    return [k for k in keys if k not in done]


def fail_orphaned_runs(inst: dg.DagsterInstance) -> int:
    """Backfill runs left STARTED/STARTING by a daemon that died with its command: mark them failed
    so the backfill logic does not wait on them forever. Only safe when no daemon is running."""
    # Only this command's backfill runs: a sync started elsewhere (the UI, a schedule) is not ours.
    orphans = inst.get_runs(
        RunsFilter(
            statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.CANCELING],
            tags={BACKFILL_KIND[0]: BACKFILL_KIND[1]},
        )
    )
    for run in orphans:
        inst.report_run_failed(run, message="worker gone: its redox-etl backfill was interrupted")
        # A killed run never gives back the `warehouse` pool slot it held: with a limit of 1, every
        # later load would wait on it forever.
        inst.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    # Runs the dead backfill had queued but not started: the resumed backfill requests its own, and
    # these would otherwise start later and hold a run slot for work already re-planned.
    queued = inst.get_runs(
        RunsFilter(
            statuses=[DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED],
            tags={BACKFILL_KIND[0]: BACKFILL_KIND[1]},
        )
    )
    for run in queued:
        inst.report_run_canceled(
            run, message="its redox-etl backfill was interrupted; the resumed one re-plans it"
        )
        inst.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    return len(orphans) + len(queued)


def _cancel_open_backfills(inst: dg.DagsterInstance) -> None:
    for backfill in inst.get_backfills(status=BulkActionStatus.REQUESTED):
        inst.update_backfill(backfill.with_status(BulkActionStatus.CANCELED))


def submit_backfill(inst: dg.DagsterInstance, keys: list[str], *, title: str) -> PartitionBackfill:
    graph = defs.resolve_asset_graph()
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=make_new_backfill_id(),
        asset_graph=graph,
        partition_names=keys,
        asset_selection=sorted(graph.get_all_asset_keys()),
        backfill_timestamp=time.time(),
        tags={RANGE_TAG: f"{keys[0]}..{keys[-1]}", BACKFILL_KIND[0]: BACKFILL_KIND[1]},
        dynamic_partitions_store=inst,
        all_partitions=False,
        title=title,
        description="redox-etl backfill",
        run_config={"ops": {EXTRACT_OP: {"config": {"refetch": False}}}},
    )
    inst.add_backfill(backfill)
    return backfill


def landed(inst: dg.DagsterInstance, backfill: PartitionBackfill) -> bool:
    """Whether every asset partition the backfill targets is materialized (an unpartitioned asset:
    since the backfill began) and none of its runs is still queued or running."""
    running = RunsFilter(tags={BACKFILL_ID_TAG: backfill.backfill_id}, statuses=IN_PROGRESS_RUN_STATUSES)
    if inst.get_runs_count(running):
        return False
    wanted: dict[dg.AssetKey, set[str | None]] = {}
    data = backfill.get_asset_backfill_data(defs.resolve_asset_graph())
    for target in data.target_subset.iterate_asset_partitions():
        wanted.setdefault(target.asset_key, set()).add(target.partition_key)
    for key, partitions in wanted.items():
        if None in partitions:
            event = inst.get_latest_materialization_event(key)
            if event is None or event.timestamp < backfill.backfill_timestamp:
                return False
        elif not partitions <= set(inst.get_materialized_partitions(key)):
            return False
    return True


def mark_landed(inst: dg.DagsterInstance, backfill_id: str) -> None:
    """Record a backfill ``landed`` found whole as Dagster's daemon would on its next tick:
    succeeded, ended now, every target materialized (the UI's backfill page counts from that).
    Only once the daemon is stopped: a tick in flight would write its own, older copy over it."""
    current = inst.get_backfill(backfill_id)
    if current is None or current.status != BulkActionStatus.REQUESTED:
        return  # the daemon got there first
    graph = defs.resolve_asset_graph()
    data = current.get_asset_backfill_data(graph)
    whole = data._replace(materialized_subset=data.target_subset, requested_subset=data.target_subset)
    inst.update_backfill(
        current.with_asset_backfill_data(whole, dynamic_partitions_store=inst, asset_graph=graph)
        .with_status(BulkActionStatus.COMPLETED_SUCCESS)
        .with_end_timestamp(time.time())
    )


def _die_with_parent() -> None:
    # Linux: the daemon gets SIGTERM when the command that started it dies, even by SIGKILL.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


@contextlib.contextmanager
def daemon() -> Iterator[subprocess.Popen[bytes]]:
    """``dagster-daemon run`` for the duration of the block (it runs the backfill and the queue), with
    the intervals of a daemon that lives for one command (pipelines/command_daemon.py)."""
    log = settings.home() / "dagster-daemon.log"
    with log.open("ab") as sink:
        # Our own interpreter and module with fixed arguments: no outside input reaches the command.
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "pipelines.command_daemon", "run", "-w", str(ROOT / "workspace.yaml")],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def backfill(
    start: dt.date,
    end: dt.date,
    *,
    on_progress: Progress | None = None,
    poll_s: float = 1.0,
) -> tuple[str, int, int]:
    """Backfill [start, end], resuming whatever an interrupted backfill left; returns
    (final status, partitions done, partitions targeted)."""
    inst = instance()
    keys = partition_keys(start, end)
    fail_orphaned_runs(inst)
    _cancel_open_backfills(inst)
    todo = missing_partitions(inst, keys)
    if not todo:
        if on_progress:
            on_progress(len(keys), len(keys), "already complete")
        return BulkActionStatus.COMPLETED_SUCCESS.value, len(keys), len(keys)
    submitted = submit_backfill(inst, todo, title=f"redox-etl {keys[0]}..{keys[-1]}")
    whole = False
    with daemon() as proc:
        while True:
            time.sleep(poll_s)
            current = inst.get_backfill(submitted.backfill_id)
            done = len(keys) - len(missing_partitions(inst, keys))
            status = current.status if current else BulkActionStatus.FAILED
            if on_progress:
                on_progress(done, len(keys), status.value.lower())
            if status not in (BulkActionStatus.REQUESTED, BulkActionStatus.CANCELING):
                break
            # The daemon marks a finished backfill only at its next tick (up to BACKFILL_TICK_S
            # later): a command that sees every target land ends now, and records it as the daemon would.
            if status == BulkActionStatus.REQUESTED and done == len(keys) and current is not None:
                whole = landed(inst, current)
                if whole:
                    break
            if proc.poll() is not None:
                log = settings.home() / "dagster-daemon.log"
                raise RuntimeError(f"dagster-daemon exited with code {proc.returncode}; see {log}")
    if whole:
        mark_landed(inst, submitted.backfill_id)
        final = inst.get_backfill(submitted.backfill_id)
        status = final.status if final else BulkActionStatus.FAILED
    done = len(keys) - len(missing_partitions(inst, keys))
    return status.value, done, len(keys)
