"""Load assets: each clinical day's landed pages, both surfaces, normalized into the unified tables.

One asset per table (``patients``, ``encounters``, ``results``, ``appointments``), in the Dagster pool
``warehouse`` whose limit of 1 makes it the single writer. Each (day, surface) is one merge
transaction: newest version of a record wins, quarantined records replace that day's quarantine
share, so a rerun replaces and never duplicates.

Invariant checked on every materialization (asset check ``records_accounted``): every record found in
the pages is loaded, collapsed as a duplicate, or quarantined with a reason.
"""

import dataclasses
import datetime as dt
from typing import Protocol

import dagster as dg
import polars as pl

from assets.partitions import backfill_policy, partition_folder
from assets.streams import extract_asset
from resources.landing import LandingResource, LandingZone
from resources.warehouse import MergeStats, Warehouse
from transforms import coverage, fhir_refs, valuesets
from transforms import datamodel as dm_norm
from transforms import fhir as fhir_norm
from transforms.common import components_in, split
from transforms.streams import SURFACES, Entity, Surface, stream


@dataclasses.dataclass
class Tally:
    records: int = 0
    loaded: int = 0
    duplicates: int = 0
    quarantined: int = 0
    inserted: int = 0
    updated: int = 0
    ignored_older: int = 0
    unknown_codes: int = 0
    # Result component rows loaded beside their records (not records themselves: not in ``loaded``).
    components: int = 0
    # Identifier-only mentions of a Data Model patient the lake already holds in full.
    known_references: int = 0
    # (day, surface) pairs whose landed pages were already loaded: nothing to do.
    skipped: int = 0
    # FHIR references into a page (urn:uuid, #contained, Patient?identifier) naming nothing it holds.
    unresolved_references: int = 0
    # Data Model ids (VisitNumber, Order ID) of the day's rows that the lake holds for more than one
    # patient: kept as separate records (keys are scoped by patient), counted here.
    ids_shared_across_patients: int = 0

    @property
    def accounted(self) -> bool:
        return self.records == self.loaded + self.duplicates + self.quarantined + self.known_references


class LoadConfig(dg.Config):
    # Load a day again even when its landed pages have not changed since they were loaded (after a
    # normalizer fix, say). Off by default, so a resumed backfill never loads a partition twice.
    reload: bool = False


def already_loaded(
    warehouse: Warehouse, zone: LandingZone, surface: Surface, entity: Entity, day: dt.date
) -> bool:
    """Whether the lake holds a load of this (table, surface, day) committed after its pages landed.

    ``partition_loads`` is written in the merge's own transaction, so its time proves the rows are in.
    A crash after some days of a run committed leaves Dagster thinking none of them materialized;
    this is what lets the resumed run skip them rather than load them a second time.
    """
    folder = partition_folder(day)
    landed = [
        m for e in stream(surface, entity).reads if (m := zone.manifest(surface, e, folder)) is not None
    ]
    loaded = warehouse.query(
        "SELECT max(loaded_at) AS t FROM partition_loads"
        " WHERE table_name = ? AND source_surface = ? AND partition_day = ?"
        # Captured files (`redox-etl load`) merge into days too, but they did not load the day's pages.
        " AND run_id NOT LIKE 'load:%'",
        [entity, surface, day],
    )["t"][0]
    if loaded is None:
        return False
    return all(loaded >= dt.datetime.fromisoformat(m.written_at) for m in landed)


def pages_for(zone: LandingZone, surface: Surface, entity: Entity, folders: list[str]) -> pl.LazyFrame:
    """The pages a stream's load reads (``Stream.reads``), with what the extract carried forward
    for the patients (Data Model clinical replies: their embedded patients, already typed)."""
    carried = dm_norm.CARRIED_DTYPE if entity == "patients" else None
    return pl.concat(
        [zone.scan(surface, e, folders, carried=carried) for e in stream(surface, entity).reads],
        how="diagonal",
    )


def count_records(pages: pl.LazyFrame, surface: Surface, entity: Entity) -> int:
    """Records in the pages, counted independently of the normalizer (FHIR: entries by resourceType;
    the Data Model counts from its own decode, which ``load_day`` shares with the normalizer)."""
    counted = (
        fhir_norm.count_entries(pages, entity) if surface == "fhir" else dm_norm.count_records(pages, entity)
    )
    return int(counted.collect()["records"][0])


def normalize_counted(pages: pl.LazyFrame, surface: Surface, entity: Entity) -> tuple[pl.DataFrame, int]:
    """The stream's normalized frame and the records its pages hold: a Data Model page is decoded
    once for both, a FHIR page counted by its entries independently of the normalizer."""
    if surface == "datamodel":
        normalized, counted = pl.collect_all(dm_norm.normalize_counted(pages, entity))
        return normalized, int(counted["records"][0])
    return stream(surface, entity).normalize(pages).collect(), count_records(pages, surface, entity)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A stream's normalized rows split for one merge: ``good`` to the table, ``bad`` to quarantine.
    The counts the split learned travel with it, so every load path tallies them the same way."""

    good: pl.DataFrame
    bad: pl.DataFrame
    # Rows the normalizer collapsed into another version of the same record.
    duplicates: int
    # Identifier-only mentions of a Data Model patient the lake already holds in full (dropped).
    known_references: int


def prepare(
    warehouse: Warehouse,
    normalized: pl.DataFrame,
    surface: Surface,
    entity: Entity,
    *,
    source_ref: bool = True,
) -> Prepared:
    """Split a normalized frame into rows and quarantine, with ``source_ref`` naming each row's page
    (off for pushed deliveries, whose pages are not landed) and Data Model patient references settled."""
    good, bad = pl.collect_all(split(normalized.lazy(), entity))
    if source_ref:
        good = with_source_ref(good, normalized)
    known = 0
    if surface == "datamodel" and entity == "patients":
        good, known = settle_references(warehouse, good)
    duplicates = int(normalized.filter(pl.col("quarantine_reason").is_null())["duplicates"].sum())
    return Prepared(good, bad, duplicates, known)


class MergeCounts(Protocol):
    inserted: int
    updated: int
    ignored_older: int


def count_merge(into: MergeCounts, stats: MergeStats) -> None:
    """Add what one merge did to a load's running counts."""
    into.inserted += stats.inserted
    into.updated += stats.updated
    into.ignored_older += stats.ignored_older


def settle_references(warehouse: Warehouse, good: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Data Model patient rows that carry identifiers only: drop those the lake already holds (a
    pointer is not a newer version), and load the rest without a timestamp, so that the patient's
    full record replaces them whenever it arrives, however old its own timestamp."""
    is_ref = good.select(dm_norm.reference_only()).to_series()
    refs = good.filter(is_ref)
    if refs.is_empty():
        return good, 0
    held = warehouse.query(
        "SELECT source_id FROM patients WHERE source_surface = 'datamodel'"
        " AND source_id IN (SELECT unnest(?::VARCHAR[]))",
        [refs["source_id"].to_list()],
    )["source_id"]
    stand_ins = refs.filter(~pl.col("source_id").is_in(held.implode())).with_columns(
        pl.lit(None, dtype=good.schema["source_updated_at"]).alias("source_updated_at")
    )
    return pl.concat([good.filter(~is_ref), stand_ins]), refs.height - stand_ins.height


def load_day(
    warehouse: Warehouse,
    zone: LandingZone,
    *,
    surface: Surface,
    entity: Entity,
    day: dt.date,
    run_id: str,
    tally: Tally,
) -> pl.DataFrame:
    """Normalize and merge one (day, surface); returns the field coverage of the stream's own pages."""
    pages = pages_for(zone, surface, entity, [partition_folder(day)]).collect().lazy()
    normalized, records = normalize_counted(pages, surface, entity)
    ready = prepare(warehouse, normalized, surface, entity)
    good = ready.good
    # Rows and quarantine in one transaction: no snapshot ever shows fetched != loaded + quarantined.
    stats = warehouse.merge(
        entity, good, partition_day=day, run_id=run_id, source_surface=surface, quarantine=ready.bad
    )
    tally.records += records
    components = components_in(good)
    tally.loaded += good.height - components
    tally.components += components
    tally.duplicates += ready.duplicates
    tally.quarantined += ready.bad.height
    tally.known_references += ready.known_references
    count_merge(tally, stats)
    tally.unknown_codes += sum(valuesets.unmapped_counts(good.drop("source_ref"), entity, surface).values())
    if surface == "fhir":
        tally.unresolved_references += fhir_refs.count_unresolved(pages, fhir_norm.RESOURCE_TYPES[entity])
    elif entity != "patients":
        tally.ids_shared_across_patients += shared_ids(warehouse, entity, good)
    own = zone.scan(surface, entity, [partition_folder(day)])
    return coverage.field_coverage(own, surface, entity).collect()


def shared_ids(warehouse: Warehouse, entity: Entity, good: pl.DataFrame) -> int:
    """How many ids at the source of ``good``'s Data Model rows (the key without its patient scope:
    an order's ID for results, else the VisitNumber) the lake holds for more than one patient."""
    local = "order_id" if entity == "results" else "substr(source_id, length(patient_source_id) + 2)"
    ids = (
        good.select(pl.col("order_id") if entity == "results" else dm_norm.local_id())
        .to_series()
        .drop_nulls()
        .unique()
    )
    if ids.is_empty():
        return 0
    return int(
        warehouse.query(
            f"SELECT local FROM (SELECT {local} AS local, patient_source_id FROM {entity}"
            " WHERE source_surface = 'datamodel') WHERE local IN (SELECT unnest(?::VARCHAR[]))"
            " GROUP BY local HAVING count(DISTINCT patient_source_id) > 1",
            [ids.to_list()],
        ).height
    )


def with_source_ref(good: pl.DataFrame, normalized: pl.DataFrame) -> pl.DataFrame:
    """The good rows with ``source_ref``: the landed page (``raw_ref``) their record came from.
    ``split`` keeps the good rows in the normalized frame's order, so the two line up."""
    refs = normalized.filter(pl.col("quarantine_reason").is_null()).get_column("raw_ref")
    return good.with_columns(refs.alias("source_ref"))


def build_load_asset(entity: Entity, partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    upstream = list(
        dict.fromkeys(
            extract_asset(stream(surface, read))
            for surface in SURFACES
            for read in stream(surface, entity).reads
        )
    )

    @dg.asset(
        name=entity,
        description=(
            f"The unified `{entity}` table: both Redox surfaces normalized (transforms/) and merged "
            "newest-version-wins into DuckLake, one transaction per day and surface."
        ),
        group_name="warehouse",
        kinds={"duckdb", "polars", "parquet"},
        partitions_def=partitions,
        backfill_policy=backfill_policy,
        deps=upstream,
        pool="warehouse",
        check_specs=[
            dg.AssetCheckSpec(
                "records_accounted",
                asset=entity,
                description="Records in the pages = loaded + duplicates collapsed + quarantined"
                " (+ identifier-only mentions of patients already held).",
            )
        ],
    )
    def load(
        context: dg.AssetExecutionContext, config: LoadConfig, warehouse: Warehouse, landing: LandingResource
    ) -> dg.MaterializeResult:
        zone = landing.zone()
        warehouse.ensure_tables()
        days = [dt.date.fromisoformat(k) for k in context.partition_keys]
        by_surface = {surface: Tally() for surface in SURFACES}
        started = dt.datetime.now(dt.UTC)
        reloaded: list[dt.date] = []
        covered: list[pl.DataFrame] = []
        loaded_keys: list[tuple[str, str, str]] = []
        for day in days:
            skipped = 0
            for surface in SURFACES:
                if not config.reload and already_loaded(warehouse, zone, surface, entity, day):
                    by_surface[surface].skipped += 1
                    skipped += 1
                    continue
                day_coverage = load_day(
                    warehouse,
                    zone,
                    surface=surface,
                    entity=entity,
                    day=day,
                    run_id=context.run_id,
                    tally=by_surface[surface],
                )
                covered.append(day_coverage.with_columns(pl.lit(partition_folder(day)).alias("partition")))
                loaded_keys.append((surface, entity, partition_folder(day)))
            if not skipped:
                reloaded.append(day)
        if covered:
            warehouse.replace_coverage(
                pl.concat(covered),
                loaded_keys,
                run_id=context.run_id,
            )
            warehouse.create_source_pages(zone.root)
        # Changes queued for these days before this load began are in the pages it just loaded.
        warehouse.clear_pending(entity, reloaded, loaded_since=started, run_id=context.run_id)
        total = Tally(**{f: sum(getattr(t, f) for t in by_surface.values()) for f in Tally.__annotations__})
        context.log.info(
            "%s: %d day(s): %d loaded, %d quarantined", entity, len(days), total.loaded, total.quarantined
        )
        metadata: dict[str, dg.RawMetadataValue] = {
            "window": f"{days[0]} .. {days[-1]}",
            **{k: v for k, v in dataclasses.asdict(total).items()},
        }
        seen = coverage.merge_counts([c.drop("partition") for c in covered])
        # Paths and counts only (no values): safe for metadata.
        metadata["top_unmapped_paths"] = dg.MetadataValue.json(coverage.top_unmapped(seen))
        metadata["unmapped_paths"] = int((~seen["mapped"]).sum()) if seen.height else 0
        for surface, tally in by_surface.items():
            metadata[f"{surface}_loaded"] = tally.loaded
            metadata[f"{surface}_quarantined"] = tally.quarantined
        return dg.MaterializeResult(
            metadata=metadata,
            check_results=[
                dg.AssetCheckResult(
                    check_name="records_accounted",
                    passed=total.accounted,
                    metadata={
                        "records": total.records,
                        "loaded": total.loaded,
                        "duplicates": total.duplicates,
                        "quarantined": total.quarantined,
                        "known_references": total.known_references,
                        # Component rows merged beside their records (parts of a record, not records).
                        "components": total.components,
                    },
                )
            ],
        )

    return load
