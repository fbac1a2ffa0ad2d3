"""Asset checks on what the lake and the landing zone hold, run after each load and on their own.

Checks (``records_accounted`` lives with the load assets in assets/warehouse.py):

- ``keys_unique`` (each table, ERROR, blocking): no natural key (source_surface, source_id) twice,
  none NULL;
- ``patient_exists`` (encounters, results, appointments; WARN): every row's patient is in
  ``patients``;
- ``timestamps_utc`` (each table; ERROR if a column is not TIMESTAMPTZ, WARN if values are out of
  range; blocking on ERROR): every timestamp is UTC-typed and plausible;
- ``fresh`` (each table, WARN): the lake's own load record (``partition_loads``) is recent;
- ``bundle_totals`` (FHIR clinical extracts, ERROR, blocking): each landed day's Bundle.total, as
  the extract recorded it in the manifest, equals the distinct entries in its pages.

Checks are unpartitioned: partitioned checks are a preview in Dagster 1.13 and record no partition
for a run over a range of days, which is how syncs and backfills run. Table checks read whole tables
(one GROUP BY in DuckDB); ``bundle_totals`` counts the entries of pages (``count_entries``, which
decodes only resourceType, is its independent count) and takes the total and the duplicates the
client saw from the manifest, so it reads only the run's days, or the most recent landed days in a
run without partitions.

Invariant: metadata, logs and messages carry counts, dates of partitions and column names only,
never a source id or any other value from a record.
"""

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import polars as pl

from assets.partitions import partition_folder
from assets.streams import extract_asset
from resources.landing import LandingResource, LandingZone
from resources.warehouse import LAKE, LakeNotFoundError, Warehouse, lake_schemas
from schema import UTC_TS
from transforms import fhir as fhir_norm
from transforms.streams import CLINICAL_ENTITIES, ENTITIES, SURFACES, Entity, clinical_streams, stream

TIMESTAMPTZ = "TIMESTAMP WITH TIME ZONE"
# Columns that say when something happened to the patient; the rest (source_updated_at, ingested_at)
# say when a record was written, which cannot be in the future beyond clock skew.
CLINICAL_TIMES = frozenset(
    {"end_at"} | {s.clinical_time for s in clinical_streams("fhir") if s.clinical_time}
)
EARLIEST = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)


class TimestampConfig(dg.Config):
    clinical_future_days: int = 400  # appointments are booked months ahead and can be rescheduled later
    record_future_minutes: int = 60  # clock skew between Redox, this machine and the catalog


class FreshConfig(dg.Config):
    # The sync schedule runs every 6 hours: two missed runs make a table stale.
    max_load_age_hours: float = 13.0
    # The schedule re-pulls the last three days, today included: the newest loaded day lags by at most 1.
    max_partition_age_days: int = 2


class BundleConfig(dg.Config):
    recent_days: int = 7  # days checked in a run that has no partitions (e.g. the lake_checks job)


def _query(warehouse: Warehouse, sql: str, params: Sequence[Any] | None = None) -> pl.DataFrame | None:
    """The result, or None while no lake exists yet (a check-only run before the first load)."""
    try:
        return warehouse.query(sql, params)
    except LakeNotFoundError:
        return None


def _by_surface(frame: pl.DataFrame | None, columns: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{surface: {column: count}}`` for every surface, zero where the frame has no row for it."""
    out: dict[str, dict[str, int]] = {surface: dict.fromkeys(columns, 0) for surface in SURFACES}
    if frame is not None:
        for row in frame.iter_rows(named=True):
            counts = out.setdefault(str(row["source_surface"]), dict.fromkeys(columns, 0))
            for column in columns:
                counts[column] = int(row[column] or 0)
    return out


def _flatten(counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    totals: dict[str, Any] = {}
    columns = next(iter(counts.values())).keys()
    for column in columns:
        totals[column] = sum(c[column] for c in counts.values())
    for surface, values in counts.items():
        for column, value in values.items():
            totals[f"{surface}_{column}"] = value
    return totals


# ---- keys_unique -------------------------------------------------------------------------------


def build_keys_unique(table: Entity) -> dg.AssetChecksDefinition:
    # Blocking: a table holding a key twice makes every later merge fail (it touches more rows than
    # it matched) and doubles what identity linking and analysts count.
    @dg.asset_check(
        asset=table,
        name="keys_unique",
        blocking=True,
        description=f"No (source_surface, source_id) appears twice in `{table}`, and none is NULL.",
    )
    def keys_unique(warehouse: Warehouse) -> dg.AssetCheckResult:
        frame = _query(
            warehouse,
            "SELECT source_surface, count(*) AS row_count,"
            " count(*) FILTER (WHERE source_id IS NULL) AS null_keys,"
            " count(*) FILTER (WHERE n > 1 AND is_first) AS duplicate_keys,"
            " count(*) FILTER (WHERE n > 1 AND NOT is_first) AS extra_rows"
            " FROM (SELECT source_surface, source_id,"
            "   count(*) OVER (PARTITION BY source_surface, source_id) AS n,"
            "   row_number() OVER (PARTITION BY source_surface, source_id) = 1 AS is_first"
            f"   FROM {table})"
            " GROUP BY source_surface",
        )
        counts = _by_surface(frame, ("row_count", "duplicate_keys", "extra_rows", "null_keys"))
        metadata = _flatten(counts)
        bad = sum(c["duplicate_keys"] + c["null_keys"] for c in counts.values())
        return dg.AssetCheckResult(passed=bad == 0, metadata=metadata)

    return keys_unique


# ---- patient_exists ----------------------------------------------------------------------------


def build_patient_exists(table: Entity) -> dg.AssetChecksDefinition:
    # WARN, not ERROR: patients load in their own asset, so a run that loads clinical days without
    # their patients (a subset run, a patient record quarantined or not yet fetched) leaves rows
    # whose patient arrives later. The rows are still right; only the person join misses them.
    # additional_deps puts the check after the patients load whenever both are in one run.
    @dg.asset_check(
        asset=table,
        name="patient_exists",
        additional_deps=["patients"],
        description=(f"Every `{table}` row's (source_surface, patient_source_id) is a row of `patients`."),
    )
    def patient_exists(warehouse: Warehouse) -> dg.AssetCheckResult:
        frame = _query(
            warehouse,
            "SELECT c.source_surface, count(*) AS row_count,"
            " count(*) FILTER (WHERE c.patient_source_id IS NULL) AS without_patient_ref,"
            " count(*) FILTER (WHERE c.patient_source_id IS NOT NULL AND p.source_id IS NULL)"
            "   AS rows_missing_patient,"
            " count(DISTINCT c.patient_source_id) FILTER (WHERE p.source_id IS NULL) AS patients_missing"
            f" FROM {table} AS c LEFT JOIN (SELECT DISTINCT source_surface, source_id FROM patients) AS p"
            "   ON p.source_surface = c.source_surface AND p.source_id = c.patient_source_id"
            " GROUP BY c.source_surface",
        )
        counts = _by_surface(
            frame, ("row_count", "rows_missing_patient", "patients_missing", "without_patient_ref")
        )
        bad = sum(c["rows_missing_patient"] + c["without_patient_ref"] for c in counts.values())
        return dg.AssetCheckResult(
            passed=bad == 0, severity=dg.AssetCheckSeverity.WARN, metadata=_flatten(counts)
        )

    return patient_exists


# ---- timestamps_utc ----------------------------------------------------------------------------


def build_timestamps_utc(table: Entity) -> dg.AssetChecksDefinition:
    declared = [name for name, dtype in lake_schemas()[table].items() if dtype == UTC_TS]

    # Blocking only takes effect on ERROR, i.e. a column that is not TIMESTAMPTZ: every reader of
    # that column would get local or naive times. Implausible values are WARN: they are what the
    # source said, loaded faithfully, and need a person to look at the source.
    @dg.asset_check(
        asset=table,
        name="timestamps_utc",
        blocking=True,
        description=(
            f"Every timestamp column of `{table}` is TIMESTAMP WITH TIME ZONE, and its values are "
            "after 1900 and not in the future (clinical times: not beyond the configured horizon)."
        ),
    )
    def timestamps_utc(config: TimestampConfig, warehouse: Warehouse) -> dg.AssetCheckResult:
        types = _query(
            warehouse,
            "SELECT column_name, data_type FROM duckdb_columns()"
            " WHERE database_name = ? AND schema_name = 'main' AND table_name = ?",
            [LAKE, table],
        )
        if types is None or types.is_empty():
            return dg.AssetCheckResult(
                passed=True, metadata={"row_count": 0, "note": "table not created yet"}
            )
        have = dict(zip(types["column_name"], types["data_type"], strict=True))
        # Declared UTC columns with another type, and any undeclared column holding a timestamp
        # (added by hand or an old migration) that is not TIMESTAMPTZ.
        wrong = sorted(
            {c for c in declared if have.get(c) != TIMESTAMPTZ}
            | {c for c, t in have.items() if t.startswith("TIMESTAMP") and t != TIMESTAMPTZ}
        )
        now = dt.datetime.now(dt.UTC)
        checked = [c for c in declared if have.get(c) == TIMESTAMPTZ]
        metadata: dict[str, Any] = {
            "timestamp_columns": len(checked),
            "wrong_type_columns": ", ".join(wrong) or "none",
        }
        out_of_range = 0
        if checked:
            selects = []
            params: list[Any] = []
            for column in checked:
                horizon = (
                    dt.timedelta(days=config.clinical_future_days)
                    if column in CLINICAL_TIMES
                    else dt.timedelta(minutes=config.record_future_minutes)
                )
                selects.append(f'count(*) FILTER (WHERE "{column}" < ?) AS "{column}_before_1900"')
                selects.append(f'count(*) FILTER (WHERE "{column}" > ?) AS "{column}_in_future"')
                params += [EARLIEST, now + horizon]
            frame = _query(
                warehouse, f"SELECT count(*) AS row_count, {', '.join(selects)} FROM {table}", params
            )
            counts = {} if frame is None else {k: int(v or 0) for k, v in frame.row(0, named=True).items()}
            metadata["row_count"] = counts.pop("row_count", 0)
            out_of_range = sum(counts.values())
            metadata["values_out_of_range"] = out_of_range
            metadata.update({k: v for k, v in counts.items() if v})
        if wrong:
            return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata)
        return dg.AssetCheckResult(
            passed=out_of_range == 0, severity=dg.AssetCheckSeverity.WARN, metadata=metadata
        )

    return timestamps_utc


# ---- fresh -------------------------------------------------------------------------------------


def build_fresh(table: Entity) -> dg.AssetChecksDefinition:
    # The lake's own load record rather than Dagster's materialization history: it is what analysts
    # read, it survives a new Dagster instance, and it has a row even for a day that loaded nothing.
    # WARN: stale tables are still correct, only behind.
    @dg.asset_check(
        asset=table,
        name="fresh",
        description=(
            f"`{table}` was loaded recently (partition_loads.loaded_at) and its newest loaded clinical "
            "day is recent; both limits are run config."
        ),
    )
    def fresh(config: FreshConfig, warehouse: Warehouse) -> dg.AssetCheckResult:
        frame = _query(
            warehouse,
            "SELECT max(loaded_at) AS last_load, max(partition_day) AS newest_day,"
            " count(DISTINCT partition_day) AS days_loaded"
            " FROM partition_loads WHERE table_name = ?",
            [table],
        )
        row = frame.row(0, named=True) if frame is not None and frame.height else {}
        last_load: dt.datetime | None = row.get("last_load")
        newest_day: dt.date | None = row.get("newest_day")
        now = dt.datetime.now(dt.UTC)
        load_age_h = None if last_load is None else (now - last_load).total_seconds() / 3600
        day_age = None if newest_day is None else (now.date() - newest_day).days
        passed = (
            load_age_h is not None
            and day_age is not None
            and load_age_h <= config.max_load_age_hours
            and day_age <= config.max_partition_age_days
        )
        metadata: dict[str, Any] = {
            "days_loaded": int(row.get("days_loaded") or 0),
            "last_load_age_hours": round(load_age_h, 2) if load_age_h is not None else None,
            "newest_partition_day": newest_day.isoformat() if newest_day else None,
            "newest_partition_age_days": day_age,
            "max_load_age_hours": config.max_load_age_hours,
            "max_partition_age_days": config.max_partition_age_days,
        }
        if last_load is not None:
            metadata["last_load"] = dg.MetadataValue.timestamp(last_load)
        return dg.AssetCheckResult(passed=passed, severity=dg.AssetCheckSeverity.WARN, metadata=metadata)

    return fresh


# ---- bundle_totals -----------------------------------------------------------------------------


def _landed_days(zone: LandingZone, entity: str, last: int) -> list[str]:
    folder = zone.folder("fhir", entity, "x").parent
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("day="))[-last:]


def _run_days(tags: Mapping[str, str]) -> list[dt.date] | None:
    """The days a run covers, from its partition tags. Checks here are unpartitioned (a partitioned
    check records no partition for a multi-day run), so the run's tags are where its days are."""
    if "dagster/partition" in tags:
        return [dt.date.fromisoformat(tags["dagster/partition"])]
    first, last = (
        tags.get("dagster/asset_partition_range_start"),
        tags.get("dagster/asset_partition_range_end"),
    )
    if not (first and last):
        return None
    lo, hi = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
    return [lo + dt.timedelta(days=n) for n in range((hi - lo).days + 1)]


def build_bundle_totals(entity: Entity) -> dg.AssetChecksDefinition:
    asset = extract_asset(stream("fhir", entity))

    # Blocking: a day whose pages hold fewer (or more) entries than the server said it had is a
    # partial or doubled landing; loading it would silently lose or duplicate records.
    @dg.asset_check(
        asset=asset,
        name="bundle_totals",
        blocking=True,
        description=(
            "For each landed day, Bundle.total in the manifest equals the entries of the searched "
            "resource type in that day's pages (the run's days, or the most recent landed days)."
        ),
    )
    def bundle_totals(
        context: dg.AssetCheckExecutionContext, config: BundleConfig, landing: LandingResource
    ) -> dg.AssetCheckResult:
        zone = landing.zone()
        days = _run_days(context.run.tags)
        folders = (
            [partition_folder(day) for day in days]
            if days is not None
            else _landed_days(zone, entity, config.recent_days)
        )
        counts = {"entries": 0, "bundle_total": 0, "missing_days": 0, "unstated_days": 0}
        mismatched: list[str] = []
        for folder in folders:
            manifest = zone.manifest("fhir", entity, folder)
            if manifest is None or not zone.exists("fhir", entity, folder):
                counts["missing_days"] += 1
                mismatched.append(folder)
                continue
            recorded = manifest.extra.get("bundle_total")
            if recorded is None:
                # Bundle.total is optional in FHIR: without one there is nothing to compare against.
                counts["unstated_days"] += 1
                continue
            pages = zone.scan("fhir", entity, [folder])
            # Bundle.total counts distinct matches; a record served on two pages (offset paging while
            # data changes) is one match, which the client counted as a duplicate when it arrived.
            entries = int(fhir_norm.count_entries(pages, entity).collect()["records"][0]) - int(
                manifest.extra.get("duplicates") or 0
            )
            counts["entries"] += entries
            counts["bundle_total"] += int(recorded)
            if entries != recorded:
                mismatched.append(folder)
        context.log.info(
            "%s bundle_totals: %d day(s) checked, %d mismatched", asset, len(folders), len(mismatched)
        )
        metadata: dict[str, Any] = {
            "days_checked": len(folders),
            "mismatched_days": len(mismatched),
            **counts,
            # Partition keys (clinical days) identify no patient; they say which day to re-extract.
            "mismatched_partitions": ", ".join(f.removeprefix("day=") for f in mismatched) or "none",
        }
        return dg.AssetCheckResult(passed=not mismatched, metadata=metadata)

    return bundle_totals


# FHIR patients are searched by _id in batches and their manifest records no total: only the three
# clinical streams carry one Bundle.total per day.
all_checks: list[dg.AssetChecksDefinition] = [
    *(build_keys_unique(t) for t in ENTITIES),
    *(build_patient_exists(t) for t in CLINICAL_ENTITIES),
    *(build_timestamps_utc(t) for t in ENTITIES),
    *(build_fresh(t) for t in ENTITIES),
    *(build_bundle_totals(e) for e in CLINICAL_ENTITIES),
]

__all__ = ["BundleConfig", "FreshConfig", "TimestampConfig", "all_checks"]
