"""Jobs, schedules and sensors: the scheduled sync of recent days, and the job backfills run.

``build(parts)`` makes them for the partitions definition the assets were built with, so a run
requested by a schedule or sensor names the same days the assets are partitioned by.
"""

import dataclasses
import time

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from assets import Parts
from assets.partitions import ranges
from resources.inbox import InboxResource
from resources.settings import Settings
from resources.warehouse import LakeNotFoundError, Warehouse


@dataclasses.dataclass(frozen=True)
class Orchestration:
    jobs: list[dg.JobDefinition | UnresolvedAssetJobDefinition]
    schedules: list[dg.ScheduleDefinition]
    sensors: list[dg.SensorDefinition]


def build(parts: Parts) -> Orchestration:
    """The sync and check jobs over ``parts``, their schedules, and the pending-days sensor."""
    daily = parts.partitions
    # Everything partitioned by day: extract from both surfaces, then load; then identity, once per run
    # (it is unpartitioned: it reconciles the whole patients table), so a sync ends reconciled. The
    # changes asset (unpartitioned too) queues older days Redox changed, for the sensor below.
    daily_sync = dg.define_asset_job(
        name="daily_sync",
        selection=dg.AssetSelection.groups(
            "changes", "extract_fhir", "extract_datamodel", "warehouse", "identity"
        ),
        partitions_def=daily,
        description="Pull the selected clinical days from both Redox surfaces, load the unified tables and "
        "reconcile patients into persons.",
    )

    @dg.schedule(
        job=daily_sync,
        cron_schedule="0 */6 * * *",
        execution_timezone="UTC",
        description="Every 6 hours: re-pull the last three days (late commits, reschedules, corrections).",
    )
    def sync_recent_days(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        keys = daily.get_partition_keys(current_time=context.scheduled_execution_time)[-3:]
        return dg.RunRequest(
            partition_key_range=dg.PartitionKeyRange(keys[0], keys[-1]),
            run_config={},
            tags={"redox-etl/kind": "scheduled-sync"},
        )

    # The lake checks alone, no extraction or load: between syncs (freshness only means something
    # then) and on demand after fixing data by hand. Reads only, so it never waits for the writer.
    lake_checks = dg.define_asset_job(
        name="lake_checks",
        selection=dg.AssetSelection.checks(*parts.checks),
        description="Run the asset checks of assets/checks.py against the lake and the landing zone.",
    )
    check_lake_hourly = dg.ScheduleDefinition(
        job=lake_checks, cron_schedule="30 * * * *", execution_timezone="UTC", name="check_lake_hourly"
    )

    @dg.sensor(
        job=daily_sync,
        minimum_interval_seconds=300,
        description="Re-pull the days that redox_changes queued in pending_partitions (records Redox "
        "changed on days no scheduled sync re-pulls), one run per run of consecutive days.",
    )
    def pending_partitions(
        context: dg.SensorEvaluationContext, warehouse: Warehouse
    ) -> dg.SensorResult | dg.SkipReason:
        try:
            pending = warehouse.pending_partitions()
        except LakeNotFoundError:
            return dg.SkipReason("no lake yet")
        if pending.is_empty():
            return dg.SkipReason("no changed days queued")
        # A run key per queue state: the same queue is requested once, a newer queue entry again.
        stamp = max(pending["queued_at"].to_list())
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"pending:{first}..{last}:{stamp}",
                    partition_key_range=dg.PartitionKeyRange(first.isoformat(), last.isoformat()),
                    tags={"redox-etl/kind": "pending-resync"},
                )
                for first, last in ranges(pending["partition_day"].to_list())
            ]
        )

    push_load, push_inbox = push_orchestration()
    return Orchestration(
        jobs=[daily_sync, lake_checks, push_load],
        schedules=[sync_recent_days, check_lake_hourly],
        sensors=[pending_partitions, push_inbox],
    )


_ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def push_orchestration() -> tuple[UnresolvedAssetJobDefinition, dg.SensorDefinition]:
    """The push lane: a job loading the inbox, and the sensor that runs it when deliveries wait."""
    push_load = dg.define_asset_job(
        name="push_load",
        selection=dg.AssetSelection.assets("pushed_deliveries"),
        description="Load the webhook inbox's new deliveries into the unified tables.",
    )

    @dg.sensor(
        job=push_load,
        minimum_interval_seconds=Settings.from_env().webhook_load_interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Load webhook deliveries that arrived since the last push load (one run at a time).",
    )
    def push_inbox(
        context: dg.SensorEvaluationContext, inbox: InboxResource
    ) -> dg.SensorResult | dg.SkipReason:
        if not inbox.file().exists():
            return dg.SkipReason("no inbox yet (start `redox-etl webhook serve`)")
        store = inbox.open()
        try:
            head, loaded = store.head_seq(), store.loaded_seq()
        finally:
            store.close()
        if head <= loaded:
            return dg.SkipReason("inbox empty")
        active = context.instance.get_runs(dg.RunsFilter(job_name="push_load", statuses=_ACTIVE), limit=1)
        if active:
            return dg.SkipReason("a push load is running")
        # One request per inbox state; the 10-minute bucket retries a state whose load failed.
        bucket = int(time.time() // 600)
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(run_key=f"inbox:{loaded}..{head}:{bucket}", tags={"redox-etl/kind": "push"})
            ]
        )

    return push_load, push_inbox
