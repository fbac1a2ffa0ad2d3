"""The Dagster code location: merges what assets/ and resources/ export. Keep it short."""

import dagster as dg

import assets
from assets.partitions import daily_partitions
from pipelines import jobs, pool_wait
from pipelines.executors import executor
from resources import all_resources
from resources.settings import Settings

# Every process that runs this code location's steps (run workers, `redox-etl sync`) loads this module.
pool_wait.apply()

# Settings are read once, here, where the definitions are built (resources/settings.py lists them).
settings = Settings.from_env()
parts = assets.build(daily_partitions(settings.start_date.isoformat()))
orchestration = jobs.build(parts)

defs = dg.Definitions(
    assets=parts.assets,
    asset_checks=parts.checks,
    jobs=orchestration.jobs,
    schedules=orchestration.schedules,
    sensors=orchestration.sensors,
    resources=all_resources(settings),
    # In the run's process by default; on Celery workers when REDOX_ETL_EXECUTOR=celery.
    executor=executor(settings),
)
