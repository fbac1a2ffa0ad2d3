"""Changes since the last look: which loaded days hold records Redox has changed since.

A sync re-pulls its recent days whole, but a correction of a months-old result, an appointment
rescheduled from an old day or a patient who moved change days no sync re-pulls. This asset asks
Redox what changed since its watermark (minus a lag for late commits) and queues those (table, day)
partitions in the lake's ``pending_partitions``, in the same transaction that moves the watermark.
A load of the table and day clears them; ``redox-etl sync`` and the ``pending_partitions`` sensor
re-pull whatever stays queued.

What each surface can say (redox-api.md):
- FHIR: ``_lastUpdated`` on Encounter, Observation and Appointment searches; Patient searches need
  ``_id``, so changed patients are found among the patients the lake holds, in ``_id`` batches, and
  queued on the latest day that mentions them (a re-pull of a day re-reads its patients);
- Data Model: Results Query by ``LastUpdated``. VisitQuery and Scheduling Booked have no change
  filter and PatientSearch no batch form, so Data Model visits, bookings and demographics changed
  on days no sync re-pulls are not seen here (docs/operations.md says what to do about it).
"""

import asyncio
import datetime as dt

import dagster as dg
import polars as pl

from resources.redox import RedoxClient
from resources.redox.fhir import Page, fhir_instant
from resources.redox.resource import RedoxResource
from resources.warehouse import Warehouse
from transforms.streams import Stream, clinical_streams, stream

WATERMARK = "changes"
# The FHIR clinical streams searched by _lastUpdated: each says its resource type, its table and
# the clinical time that picks the partition day of a changed record.
FHIR_CHANGES: tuple[Stream, ...] = tuple(clinical_streams("fhir"))
# Data Model: only Results Query has a change filter.
DM_CHANGES: Stream = stream("datamodel", "results")
PENDING_SCHEMA = {"table_name": pl.String(), "partition_day": pl.Date()}


class ChangesConfig(dg.Config):
    # Redox may commit a record with a lastUpdated a little before it becomes searchable.
    lag_minutes: int = 10


def _pages(bodies: list[bytes]) -> pl.LazyFrame:
    return pl.LazyFrame(
        {
            "raw_ref": [f"changes/page-{i:05d}" for i in range(len(bodies))],
            "body": [b.decode() for b in bodies],
        },
        schema={"raw_ref": pl.String(), "body": pl.String()},
    )


def _days(changed: Stream, bodies: list[bytes]) -> pl.LazyFrame:
    """(table, day) of each record on the pages, by the stream's clinical time."""
    assert changed.clinical_time is not None, "only clinical streams have days"
    return (
        changed.normalize(_pages(bodies))
        .filter(pl.col("quarantine_reason").is_null())
        .select(
            pl.lit(changed.table).alias("table_name"),
            pl.col(changed.clinical_time).dt.date().alias("partition_day"),
        )
    )


def _server_time(page: Page) -> dt.datetime | None:
    """When the server ran the search (``Bundle.meta.lastUpdated``): the watermark is taken on
    Redox's clock, so a skewed local clock can neither skip a change nor re-read one forever."""
    stamp = (page.bundle.get("meta") or {}).get("lastUpdated")
    try:
        return dt.datetime.fromisoformat(stamp).astimezone(dt.UTC) if isinstance(stamp, str) else None
    except ValueError:
        return None


async def _search(
    client: RedoxClient, resource: str, since: dt.datetime, clock: list[dt.datetime]
) -> list[bytes]:
    bodies = []
    async for page in client.fhir.search(resource, params={"_lastUpdated": [f"ge{fhir_instant(since)}"]}):
        if page.number == 1 and (at := _server_time(page)) is not None:
            clock.append(at)
        bodies.append(page.raw)
    return bodies


async def _changed(
    client: RedoxClient, warehouse: Warehouse, since: dt.datetime, clock: list[dt.datetime]
) -> pl.DataFrame:
    found: list[pl.LazyFrame] = []
    for changed in FHIR_CHANGES:
        found.append(_days(changed, await _search(client, changed.source, since, clock)))
    reply = await client.datamodel.results_changed(start=since)
    found.append(_days(DM_CHANGES, [reply.raw]))

    known = warehouse.query("SELECT source_id FROM patients WHERE source_surface = 'fhir'")["source_id"]
    if known.len():
        bodies = [
            page.raw
            async for page in client.fhir.search_patients(
                stream("fhir", "patients").source,
                patients=known.to_list(),
                patient_param="_id",
                params={"_lastUpdated": [f"ge{fhir_instant(since)}"]},
            )
        ]
        moved = stream("fhir", "patients").normalize(_pages(bodies)).select("source_id").collect()
        if moved.height:
            # The latest day that mentions the patient: its re-pull re-reads the patient.
            mentions = " UNION ALL ".join(
                f"SELECT patient_source_id AS p, CAST({c.clinical_time} AS DATE) AS day FROM {c.table}"
                " WHERE source_surface = 'fhir'"
                for c in FHIR_CHANGES
            )
            latest = warehouse.query(
                f"SELECT 'patients' AS table_name, max(day) AS partition_day FROM ({mentions})"
                " WHERE p IN (SELECT unnest(?::VARCHAR[])) GROUP BY p",
                [moved["source_id"].to_list()],
            )
            found.append(latest.lazy())
    return pl.concat([f.cast(PENDING_SCHEMA) for f in found]).drop_nulls().unique().collect()  # type: ignore[arg-type]


def build_changes_asset(partitions: dg.TimeWindowPartitionsDefinition) -> dg.AssetsDefinition:
    """The changes asset; ``partitions`` bounds the days it may queue (none before the first)."""
    first_day = partitions.start.date()

    @dg.asset(
        name="redox_changes",
        description="Days holding records Redox changed since the last look, queued in pending_partitions "
        "for a re-pull; moves the `changes` watermark in the same transaction.",
        group_name="changes",
        kinds={"python", "redox"},
        pool="warehouse",
    )
    def redox_changes(
        context: dg.AssetExecutionContext, config: ChangesConfig, redox: RedoxResource, warehouse: Warehouse
    ) -> dg.MaterializeResult:
        started = dt.datetime.now(dt.UTC)
        warehouse.ensure_tables()
        since = warehouse.get_watermark(WATERMARK)

        async def run() -> tuple[pl.DataFrame, list[dt.datetime], pl.DataFrame]:
            clock: list[dt.datetime] = []
            async with redox.client(run_id=context.run_id) as client:
                if since is None:
                    # First look: nothing loaded before now can have changed; only Redox's time is needed.
                    await _search(client, FHIR_CHANGES[0].source, started, clock)
                    changed = pl.DataFrame(schema=PENDING_SCHEMA)
                else:
                    lookback = since - dt.timedelta(minutes=config.lag_minutes)
                    changed = await _changed(client, warehouse, lookback, clock)
                return changed, clock, client.audit_frame()

        pending, clock, audit = asyncio.run(run())
        pending = pending.filter(pl.col("partition_day").is_between(first_day, started.date()))
        # The earliest search's own time: changes committed while the searches ran are seen next time.
        watermark = min(clock, default=started)
        warehouse.append_api_calls(audit, run_id=context.run_id, step="redox_changes")
        queued = warehouse.queue_changes(WATERMARK, watermark, pending, run_id=context.run_id)
        per_table = pending.group_by("table_name").len().sort("table_name")
        context.log.info("changes since %s: %d (table, day) partition(s) queued", since, queued)
        return dg.MaterializeResult(
            metadata={
                "since": str(since) if since else "first look: watermark set",
                "queued": queued,
                "days": sorted({d.isoformat() for d in pending["partition_day"]}),
                "watermark": watermark.isoformat(),
                "requests": audit.height,
                **{f"queued_{row['table_name']}": row["len"] for row in per_table.iter_rows(named=True)},
            }
        )

    return redox_changes


__all__ = ["ChangesConfig", "build_changes_asset"]
