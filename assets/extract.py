"""Extract assets: one per stream (Redox surface x entity), partitioned by clinical day.

Each materialization asks Redox for its days' windows through the one throttled client and lands
the response bodies untouched (resources/landing.py) as a new version of the day's file, which the
day's manifest then names together with what the extract learned on the way (see ``Extra``).

Invariants:
- an extract step writes nothing to the warehouse tables but ``api_calls`` (its own audit trail);
  the load assets own every other table;
- in a backfill a day already landed is not fetched again (``refetch=False``), so resuming after a
  crash re-fetches only the days that were in flight; scheduled syncs refetch (``refetch=True``)
  because recent days still change;
- patients are discovered from the day's clinical records and fetched once per run: in a backfill
  only when new or stale, in a sync always (see ``ExtractConfig``);
- the extract decodes no page itself beyond the transport's parse, except to find the patients a
  day's FHIR clinical pages reference (their references only); a Data Model clinical reply's
  embedded patients are typed from that parse and landed beside it (``carried``), so neither the
  patients extract nor the patients load decodes the clinical page again.
"""

import asyncio
import datetime as dt
from collections.abc import Sequence

import dagster as dg
import polars as pl

from assets.partitions import backfill_policy, day_window, partition_folder
from assets.streams import extract_asset
from resources.landing import LandingResource, LandingZone, RawPage
from resources.redox import RedoxClient, date_window
from resources.redox.resource import RedoxResource
from resources.warehouse import Warehouse
from transforms import datamodel
from transforms.references import referenced_patients
from transforms.streams import CLINICAL_ENTITIES, Stream, Surface, clinical_streams

# Manifest ``extra`` of a landed day: what the extract learned while the pages passed through it,
# so later steps read it instead of decoding the pages again. FHIR clinical days: ``bundle_total``
# (Bundle.total of page 1, None if the server left it out), ``entries`` (entries on the pages) and
# ``duplicates`` (entries the client had already received on an earlier page of the search).
# Patients days: ``referenced_patients`` (distinct patients the day's clinical pages name) and
# ``patients_wanted`` (those fetched).
Extra = dict[str, int | str | None]


class ExtractConfig(dg.Config):
    refetch: bool = True
    # Without refetch (a backfill), a patient loaded longer ago than this is fetched again when a
    # record references it; with refetch (a sync), every referenced patient is fetched again.
    stale_after_days: int = 7


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _fetch_clinical(
    client: RedoxClient, stream: Stream, day: dt.date
) -> tuple[list[RawPage], Extra, pl.Series | None]:
    start, end = day_window(day)
    pages: list[RawPage] = []
    if stream.surface == "fhir":
        total: int | None = None
        entries = duplicates = 0
        async for page in client.fhir.search(stream.source, params=date_window(start, end)):
            pages.append(RawPage(page.raw, f"{page.endpoint} day={day}", _now()))
            total = page.total if page.total is not None else total
            entries += page.entries
            duplicates += page.duplicates
        return pages, {"bundle_total": total, "entries": entries, "duplicates": duplicates}, None
    # A day too big for one answer comes back in several windows' replies, one page each.
    replies = await client.datamodel.windowed(stream.source, start=start, end=end)
    # The replies' patients, typed from the client's parse: the patients extract and load read them
    # from here rather than decoding the pages again.
    carried = datamodel.carried_patients([reply.json for reply in replies])
    return [RawPage(r.raw, f"{r.endpoint} day={day}", _now()) for r in replies], {}, carried


def _referenced_patients(zone: LandingZone, surface: Surface, day: dt.date) -> pl.DataFrame:
    folder = [partition_folder(day)]
    pages = pl.concat(
        [zone.scan(surface, entity, folder, carried=datamodel.CARRIED_DTYPE) for entity in CLINICAL_ENTITIES],
        how="diagonal",
    )
    return referenced_patients(surface, pages).collect()


def _fresh_patients(warehouse: Warehouse, surface: Surface, stale_after: dt.timedelta) -> set[str]:
    try:
        known = warehouse.query(
            # A stand-in (identifiers only, no names) is not a fetched record: it does not count.
            "SELECT source_id FROM patients WHERE source_surface = ? AND ingested_at >= ?"
            " AND family_name IS NOT NULL",
            [surface, _now() - stale_after],
        )
    except Exception:  # a lake that does not exist yet simply knows no patients
        return set()
    return set(known["source_id"].to_list())


async def _fetch_patients(
    client: RedoxClient,
    patients: Stream,
    wanted: pl.DataFrame,
    day: dt.date,
) -> list[RawPage]:
    pages: list[RawPage] = []
    if wanted.is_empty():
        return pages
    if patients.surface == "fhir":
        ids = sorted(wanted["source_id"].to_list())
        async for page in client.fhir.search_patients(patients.source, patients=ids, patient_param="_id"):
            pages.append(RawPage(page.raw, f"{page.endpoint} day={day}", _now()))
        return pages
    # The Data Model has no batch patient read: one PatientSearch per patient, by its MR identifier.
    limit = asyncio.Semaphore(client.settings.max_in_flight)

    async def one(identifiers: Sequence[dict[str, str]]) -> RawPage:
        async with limit:
            reply = await client.datamodel.patient_search(
                identifiers=[
                    {"ID": i["value"], "IDType": i["system"].rsplit(":", 1)[-1]} for i in identifiers[:1]
                ]
            )
        return RawPage(reply.raw, f"{reply.endpoint} day={day}", _now())

    tasks = [one(row["identifiers"]) for row in wanted.iter_rows(named=True) if row["identifiers"]]
    return list(await asyncio.gather(*tasks))


def build_extract_asset(stream: Stream, partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    deps = [extract_asset(s) for s in clinical_streams(stream.surface)] if stream.entity == "patients" else []
    name = extract_asset(stream)

    @dg.asset(
        name=name,
        description=(
            f"Raw {stream.surface} {stream.entity} pages ({stream.source}) for each clinical day, "
            "landed untouched under `raw/` in the lake folder."
        ),
        group_name=f"extract_{stream.surface}",
        kinds={"python", "redox", "parquet"},
        partitions_def=partitions,
        backfill_policy=backfill_policy,
        deps=deps,
    )
    def extract(
        context: dg.AssetExecutionContext,
        config: ExtractConfig,
        redox: RedoxResource,
        landing: LandingResource,
        warehouse: Warehouse,
    ) -> dg.MaterializeResult:
        zone = landing.zone()
        days = [dt.date.fromisoformat(k) for k in context.partition_keys]
        stats = {
            "pages": 0,
            "bytes": 0,
            "skipped_days": 0,
            "patients_wanted": 0,
            "bundle_total": 0,
            "entries": 0,
            "duplicates": 0,
        }

        async def run() -> pl.DataFrame:
            fetched: set[str] = set()
            async with redox.client(run_id=context.run_id) as client:
                for day in days:
                    folder = partition_folder(day)
                    if not config.refetch and zone.exists(stream.surface, stream.entity, folder):
                        stats["skipped_days"] += 1
                        continue
                    if stream.entity == "patients":
                        refs = _referenced_patients(zone, stream.surface, day)
                        # A re-pull of recent days re-reads every patient they mention: demographics
                        # change without any sign in the clinical records (a move, a new name).
                        fresh = (
                            set()
                            if config.refetch
                            else _fresh_patients(
                                warehouse, stream.surface, dt.timedelta(days=config.stale_after_days)
                            )
                        )
                        wanted = refs.filter(
                            ~pl.col("complete") & ~pl.col("source_id").is_in(list(fresh | fetched))
                        )
                        fetched.update(wanted["source_id"].to_list())
                        stats["patients_wanted"] += wanted.height
                        pages = await _fetch_patients(client, stream, wanted, day)
                        extra: Extra = {"referenced_patients": refs.height, "patients_wanted": wanted.height}
                        carried = None
                    else:
                        pages, extra, carried = await _fetch_clinical(client, stream, day)
                    manifest = zone.write(
                        stream.surface,
                        stream.entity,
                        folder,
                        pages,
                        run_id=context.run_id,
                        extra=extra,
                        carried=carried,
                    )
                    stats["pages"] += manifest.pages
                    stats["bytes"] += manifest.bytes
                    for key in ("bundle_total", "entries", "duplicates"):
                        stats[key] += int(extra.get(key) or 0)
                return client.audit_frame()

        audit = asyncio.run(run())
        step = f"{name}:{context.partition_keys[0]}..{context.partition_keys[-1]}"
        warehouse.append_api_calls(audit, run_id=context.run_id, step=step)
        context.log.info(
            "%s: %d day(s), %d page(s), %d request(s)",
            name,
            len(days),
            stats["pages"],
            audit.height,
        )
        return dg.MaterializeResult(
            metadata={
                "window": f"{days[0]} .. {days[-1]}",
                "days": len(days),
                "requests": audit.height,
                "retries": int((audit["attempt"] > 1).sum()) if audit.height else 0,
                **stats,
            }
        )

    return extract


__all__ = ["ExtractConfig", "build_extract_asset"]
