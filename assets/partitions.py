"""Daily partitions by clinical day (UTC), shared by every extract and load asset and the jobs.

A partition is one UTC calendar day of clinical time (encounter start, result effective time,
appointment start). The first day is configuration, passed to ``daily_partitions`` by whoever
builds the definitions (pipelines/definitions.py), so a deployment can reach as far back as its Redox
connection holds data; ``end_offset=1`` includes today, which is still filling.

Invariant: one definitions object carries one partitions definition; assets, jobs, schedules and
the runner all use that object (nothing here reads the environment at import).
"""

import datetime as dt

import dagster as dg

from resources.settings import Settings

# The first day when nothing configures one (the settings' default): what tests and benchmarks
# build against.
DEFAULT_START_DATE: str = Settings.model_fields["start_date"].default.isoformat()

# A backfill run covers up to four days. A run extracts all its days at once (assets/extract.py), so
# its Dagster overhead (a run process, ~25 steps, the checks) is paid once per four days of requests,
# while the runs after it overlap its load and identity (three extract at once, one loading
# at a time). Measured at hospital volume (bench/backfill.py, docs/benchmarks.md), the tail after the
# final request is the last runs' loads plus identity, which grows with the days a run holds: four
# days keeps it shorter than a week would, at the cost of more run start-ups (which overlap other
# runs' requests). An interrupted run re-fetches at most its unlanded days.
backfill_policy = dg.BackfillPolicy.multi_run(max_partitions_per_run=4)

# The Dagster pool of the extract op and its limit: how many runs extract at once. Runs that share
# the budget fairly finish their extracts together, and a run started only then leaves the budget
# idle for its start-up and its first (clinical) requests while the others load. dagster.yaml
# therefore starts more runs than this (``op_granularity_run_buffer``): the extra ones wait for an
# extract slot already started, and take it the moment one frees. pipelines/instance.py sets the
# limit on an instance that has none for the pool (``dagster instance concurrency set`` changes it).
EXTRACT_POOL = "redox_extract"
EXTRACT_POOL_LIMIT = 3


def daily_partitions(start_date: str) -> dg.DailyPartitionsDefinition:
    return dg.DailyPartitionsDefinition(start_date=start_date, timezone="UTC", end_offset=1)


def ranges(days: list[dt.date]) -> list[tuple[dt.date, dt.date]]:
    """Runs of consecutive days, first to last: one Dagster run (a partition range) each."""
    out: list[tuple[dt.date, dt.date]] = []
    for day in sorted(set(days)):
        if out and day - out[-1][1] == dt.timedelta(days=1):
            out[-1] = (out[-1][0], day)
        else:
            out.append((day, day))
    return out


def day_window(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """The half-open UTC window [day 00:00, next day 00:00) a partition covers."""
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def partition_folder(day: dt.date) -> str:
    """The landing-zone folder of a partition's pages."""
    return f"day={day.isoformat()}"
