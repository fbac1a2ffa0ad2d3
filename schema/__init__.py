"""The unified warehouse schema: one polars schema per table, shared by every surface.

This module is the contract between the normalizers (which must produce exactly these columns,
in this order, with these dtypes), the warehouse loader (which creates DuckLake tables from them)
and the data dictionary (docs/data-dictionary.md, which explains every column).

Invariants kept here:
- every timestamp is ``Datetime("us", "UTC")``; naive or offset-shifted values never leave a transform;
- every clinical table carries ``source_surface`` ('fhir' | 'datamodel') and ``source_id``, which
  together are the natural key;
- a coded field is stored twice: the mapped value from an explicit ValueSet (``VALUESETS``) and the
  source's own code in ``<field>_source``, so no mapping ever hides what the source said.
"""

from typing import Final

import polars as pl

UTC_TS: Final = pl.Datetime("us", "UTC")

SURFACES: Final = ("fhir", "datamodel")

IDENTIFIER: Final = pl.Struct({"system": pl.String(), "value": pl.String()})

# Canonical vocabularies. The normalizers map every source code into one of these (or null when the
# source sent nothing); a code that is present but unknown maps to "unknown" where the set has it,
# and the raw code always survives in the `_source` column.
VALUESETS: Final[dict[str, tuple[str, ...]]] = {
    "sex": ("male", "female", "other", "unknown"),
    "encounter_class": ("ambulatory", "emergency", "inpatient", "observation", "virtual", "unknown"),
    "encounter_status": (
        "planned",
        "arrived",
        "in-progress",
        "finished",
        "cancelled",
        "entered-in-error",
        "unknown",
    ),
    "appointment_status": (
        "booked",
        "arrived",
        "fulfilled",
        "cancelled",
        "noshow",
        "entered-in-error",
        "unknown",
    ),
    "result_status": ("preliminary", "final", "corrected", "cancelled", "entered-in-error", "unknown"),
    "abnormal_flag": ("normal", "low", "high", "critical_low", "critical_high", "abnormal", "unknown"),
}

# Where a row of the four unified tables came from: ``<surface>/<entity>/<partition>/page-NNNNN``,
# the landed page that held its source record (the ``source_pages`` view's ``raw_ref``). Added at
# load beside LINEAGE; null for rows loaded before it existed.
SOURCE_REF: Final[dict[str, pl.DataType]] = {"source_ref": pl.String()}
# What ``results.value_type`` can say: the FHIR R4 Observation value[x] type the value came from
# (Data Model ValueTypes map onto the same words), or 'absent' when the source said why there is none.
VALUE_TYPES: Final = (
    "quantity",
    "codeable_concept",
    "string",
    "boolean",
    "integer",
    "range",
    "ratio",
    "sampled_data",
    "time",
    "datetime",
    "period",
    "absent",
)

# Columns every clinical and patient row carries about where it came from; added at load.
LINEAGE: Final[dict[str, pl.DataType]] = {
    "partition_day": pl.Date(),
    "run_id": pl.String(),
    "ingested_at": UTC_TS,
}

PATIENTS: Final = pl.Schema(
    {
        "source_surface": pl.String(),
        "source_id": pl.String(),
        "identifiers": pl.List(IDENTIFIER),
        "given_name": pl.String(),
        "middle_name": pl.String(),
        "family_name": pl.String(),
        "birth_date": pl.Date(),
        "sex": pl.String(),
        "sex_source": pl.String(),
        "ssn": pl.String(),
        "address_line": pl.String(),
        "address_city": pl.String(),
        "address_state": pl.String(),
        "address_postal_code": pl.String(),
        "phone": pl.String(),
        "email": pl.String(),
        "source_updated_at": UTC_TS,
    }
)

ENCOUNTERS: Final = pl.Schema(
    {
        "source_surface": pl.String(),
        "source_id": pl.String(),
        "patient_source_id": pl.String(),
        "class": pl.String(),
        "class_source": pl.String(),
        "type_code": pl.String(),
        "type_system": pl.String(),
        "type_system_source": pl.String(),
        "type_display": pl.String(),
        "status": pl.String(),
        "status_source": pl.String(),
        "start_at": UTC_TS,
        "end_at": UTC_TS,
        "location": pl.String(),
        "attending_provider_id": pl.String(),
        "attending_provider_name": pl.String(),
        "reason": pl.String(),
        "source_updated_at": UTC_TS,
    }
)

RESULTS: Final = pl.Schema(
    {
        "source_surface": pl.String(),
        "source_id": pl.String(),
        "patient_source_id": pl.String(),
        "order_id": pl.String(),
        # A component row (one of an Observation's component[], or a Data Model observation's
        # component) carries its parent record's source_id; null on a record's own row.
        "parent_source_id": pl.String(),
        # A panel's members (FHIR hasMember, as source_ids of the member results); null otherwise.
        "member_source_ids": pl.List(pl.String()),
        "code": pl.String(),
        "code_system": pl.String(),
        "code_system_source": pl.String(),
        "display": pl.String(),
        # Which value[x] the source sent (schema.VALUE_TYPES); 'absent' with absent_reason when none.
        "value_type": pl.String(),
        "value_num": pl.Float64(),
        "value_comparator": pl.String(),
        "value_text": pl.String(),
        "value_code": pl.String(),
        "value_code_system": pl.String(),
        "value_code_system_source": pl.String(),
        "value_code_display": pl.String(),
        "value_low": pl.Float64(),
        "value_high": pl.Float64(),
        "value_denominator": pl.Float64(),
        "value_at": UTC_TS,
        "value_end_at": UTC_TS,
        "absent_reason": pl.String(),
        "unit": pl.String(),
        "reference_low": pl.Float64(),
        "reference_high": pl.Float64(),
        "reference_text": pl.String(),
        "abnormal_flag": pl.String(),
        "abnormal_flag_source": pl.String(),
        "status": pl.String(),
        "status_source": pl.String(),
        "effective_at": UTC_TS,
        "source_updated_at": UTC_TS,
    }
)

APPOINTMENTS: Final = pl.Schema(
    {
        "source_surface": pl.String(),
        "source_id": pl.String(),
        "patient_source_id": pl.String(),
        "status": pl.String(),
        "status_source": pl.String(),
        "start_at": UTC_TS,
        "end_at": UTC_TS,
        "duration_min": pl.Int32(),
        "type_code": pl.String(),
        "type_display": pl.String(),
        "location": pl.String(),
        "provider_id": pl.String(),
        "provider_name": pl.String(),
        "reason": pl.String(),
        "source_updated_at": UTC_TS,
    }
)

# A record that could not be normalized. `raw` keeps the record exactly as received so that a
# person can fix the mapping and replay it; it lives only in the warehouse, never in logs.
QUARANTINE: Final = pl.Schema(
    {
        "source_surface": pl.String(),
        "entity": pl.String(),
        "source_id": pl.String(),
        "reason": pl.String(),
        "raw": pl.String(),
        "raw_ref": pl.String(),
    }
)

API_CALLS: Final = pl.Schema(
    {
        "called_at": UTC_TS,
        "surface": pl.String(),
        "method": pl.String(),
        "endpoint": pl.String(),
        "status": pl.Int32(),
        "attempt": pl.Int32(),
        "latency_ms": pl.Float64(),
        "bytes": pl.Int64(),
        "run_id": pl.String(),
    }
)

SYNC_STATE: Final = pl.Schema(
    {
        "stream": pl.String(),
        "watermark": UTC_TS,
        "updated_at": UTC_TS,
        "run_id": pl.String(),
    }
)

# Written by the warehouse itself, one row per merge of one (table, surface, partition day): the load
# audit trail that shows which run loaded what, so "no partition loaded twice" and "rows fetched = rows
# loaded + rows quarantined" can be checked with SQL. `rows` counts the frame handed to the merge;
# `duplicates` are extra versions of one key inside that frame (only the newest is merged);
# `quarantined` is set when the same transaction replaced the partition's quarantine rows.
PARTITION_LOADS: Final = pl.Schema(
    {
        "table_name": pl.String(),
        "source_surface": pl.String(),
        "partition_day": pl.Date(),
        "run_id": pl.String(),
        "rows": pl.Int64(),
        "inserted": pl.Int64(),
        "updated": pl.Int64(),
        "ignored_older": pl.Int64(),
        "duplicates": pl.Int64(),
        "loaded_at": UTC_TS,
        "quarantined": pl.Int64(),
    }
)

# Added at load to api_calls: the Dagster step that wrote the rows, so a retried step replaces its own
# audit rows instead of appending them a second time.
API_CALLS_LINEAGE: Final[dict[str, pl.DataType]] = {
    "step": pl.String(),
    "ingested_at": UTC_TS,
}

# Partitions known to hold records Redox changed since they were loaded (found by the changes asset
# through `_lastUpdated` / `LastUpdated`), queued until a load of that table and day clears them.
PENDING_PARTITIONS: Final = pl.Schema(
    {
        "table_name": pl.String(),
        "partition_day": pl.Date(),
        "queued_at": UTC_TS,
        "run_id": pl.String(),
    }
)

# Per stream, landed partition (``day=...`` or ``load=<sha256>``) and source JSON path: how many
# records carried a value there and whether a column holds it (transforms/coverage.py's MAPPED). A
# reload of a partition replaces its rows, so sums over partitions count each landed record once.
FIELD_COVERAGE: Final = pl.Schema(
    {
        "surface": pl.String(),
        "entity": pl.String(),
        "partition": pl.String(),
        "path": pl.String(),
        "records": pl.Int64(),
        "mapped": pl.Boolean(),
        "run_id": pl.String(),
        "computed_at": UTC_TS,
    }
)

# One row per file `redox-etl load` ingested: its content hash (the lineage key: rows carry run_id
# `load:<sha256[:12]>`), the name it was given (kept here only, never logged: names may hold PHI),
# and what it held. A file whose hash is here is not loaded again.
CAPTURED_FILES: Final = pl.Schema(
    {
        "sha256": pl.String(),
        "run_id": pl.String(),
        "file_name": pl.String(),
        "bytes": pl.Int64(),
        "documents": pl.Int64(),
        "pages": pl.Int64(),
        "unrouted": pl.Int64(),
        "other_records": pl.String(),  # JSON: {"fhir:Condition": 3, "datamodel:Order": 1}
        "loaded_at": UTC_TS,
    }
)

# Tables the warehouse keeps about its own loads (not produced by any normalizer).
WAREHOUSE_TABLES: Final[dict[str, pl.Schema]] = {
    "partition_loads": PARTITION_LOADS,
    "pending_partitions": PENDING_PARTITIONS,
    "field_coverage": FIELD_COVERAGE,
    "captured_files": CAPTURED_FILES,
}

# The four unified tables the normalizers produce (patients and the three clinical tables).
UNIFIED_TABLES: Final[dict[str, pl.Schema]] = {
    "patients": PATIENTS,
    "encounters": ENCOUNTERS,
    "results": RESULTS,
    "appointments": APPOINTMENTS,
}

TABLES: Final[dict[str, pl.Schema]] = {
    **UNIFIED_TABLES,
    "quarantine": QUARANTINE,
    "api_calls": API_CALLS,
    "sync_state": SYNC_STATE,
}

NATURAL_KEY: Final = ("source_surface", "source_id")


def empty(table: str) -> pl.DataFrame:
    """An empty frame with the table's exact schema, for the "nothing in this window" case."""
    return pl.DataFrame(schema=TABLES[table])


def conform(frame: pl.LazyFrame, table: str) -> pl.LazyFrame:
    """Select the table's columns in order, cast to its dtypes, adding missing ones as nulls."""
    schema = TABLES[table]
    have = set(frame.collect_schema().names())
    return frame.select(
        [
            (pl.col(name) if name in have else pl.lit(None)).cast(dtype).alias(name)
            for name, dtype in schema.items()
        ]
    )
