"""Daily partitions by clinical day (UTC), shared by every extract and load asset.

A partition is one UTC calendar day of clinical time (encounter start, result effective time,
appointment start). The first day comes from ``REDOX_ETL_START_DATE`` so a deployment can reach as
far back as its Redox connection holds data; ``end_offset=1`` includes today, which is still filling.
"""

import datetime as dt
import os

import dagster as dg

START_DATE = os.environ.get("REDOX_ETL_START_DATE", "2025-01-01")

daily = dg.DailyPartitionsDefinition(start_date=START_DATE, timezone="UTC", end_offset=1)

# A backfill run covers up to a week: few enough runs that process start-up is not the cost, small
# enough that an interrupted run re-fetches at most a week (and only its days not yet landed).
backfill_policy = dg.BackfillPolicy.multi_run(max_partitions_per_run=7)


def ranges(days: list[dt.date]) -> list[tuple[dt.date, dt.date]]:
    """Runs of consecutive days, first to last: one Dagster run (a partition range) each."""
    out: list[tuple[dt.date, dt.date]] = []
    for day in sorted(set(days)):
        if out and day - out[-1][1] == dt.timedelta(days=1):
            out[-1] = (out[-1][0], day)
        else:
            out.append((day, day))
    return out
