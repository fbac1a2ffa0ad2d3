"""The Dagster code location: merges what assets/ and resources/ export. Keep it short."""

import os

import dagster as dg

import assets
from assets.partitions import DEFAULT_START_DATE, daily_partitions
from pipelines import jobs
from resources import all_resources

# The one place the first partition day is read (the settings class will take it over).
START_DATE = os.environ.get("REDOX_ETL_START_DATE", DEFAULT_START_DATE)

parts = assets.build(daily_partitions(START_DATE))
orchestration = jobs.build(parts)

defs = dg.Definitions(
    assets=parts.assets,
    asset_checks=parts.checks,
    jobs=orchestration.jobs,
    schedules=orchestration.schedules,
    sensors=orchestration.sensors,
    resources=all_resources(),
    # Steps of a run share one process: extraction is async fan-out inside a step, and process
    # start-up would otherwise dominate a day's work.
    executor=dg.in_process_executor,
)
