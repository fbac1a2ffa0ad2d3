"""The Dagster code location: merges what assets/ and resources/ export. Keep it short."""

import dagster as dg

from assets import all_assets, all_checks
from pipelines.jobs import jobs, schedules, sensors
from resources import all_resources

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=jobs,
    schedules=schedules,
    sensors=sensors,
    resources=all_resources(),
    # Steps of a run share one process: extraction is async fan-out inside a step, and process
    # start-up would otherwise dominate a day's work.
    executor=dg.in_process_executor,
)
