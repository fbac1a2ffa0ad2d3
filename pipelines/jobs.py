"""Jobs and schedules: the scheduled sync of recent days, and the job backfills run."""

import dagster as dg

from assets.checks import all_checks
from pipelines.partitions import daily

# Everything partitioned by day: extract from both surfaces, then load; then identity, once per run
# (it is unpartitioned: it reconciles the whole patients table), so a sync ends reconciled.
daily_sync = dg.define_asset_job(
    name="daily_sync",
    selection=dg.AssetSelection.groups("extract_fhir", "extract_datamodel", "warehouse", "identity"),
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
    selection=dg.AssetSelection.checks(*all_checks),
    description="Run the asset checks of assets/checks.py against the lake and the landing zone.",
)
check_lake_hourly = dg.ScheduleDefinition(
    job=lake_checks, cron_schedule="30 * * * *", execution_timezone="UTC", name="check_lake_hourly"
)

jobs = [daily_sync, lake_checks]
schedules = [sync_recent_days, check_lake_hourly]
