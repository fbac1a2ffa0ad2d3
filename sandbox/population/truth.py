"""The ground truth as polars frames: the current version of every record, named and typed like the
unified warehouse tables, plus which surface patients are one person, hard groups and noise.

Invariant: column names and dtypes mirror the unified schema without importing the pipeline (the
sandbox stands in for a remote system); reading the truth changes nothing in the store.
"""

import operator
from typing import Final

import polars as pl
import pyarrow as pa

from sandbox.model import Kind, Person, Result, Surface, Version, provider_form
from sandbox.population.ids import SURFACES
from sandbox.store import Store

_TS: Final = pl.Datetime("us", "UTC")
_ID_LIST: Final = pl.List(pl.Struct({"system": pl.String(), "value": pl.String()}))
# Truth column -> (record attribute, dtype); unified names, so truth compares with the warehouse.
_TRUTH: Final[dict[Kind, dict[str, tuple[str, pl.DataType]]]] = {
    "patients": {
        "source_surface": ("surface", pl.String()),
        "source_id": ("source_id", pl.String()),
        "identifiers": ("identifiers", _ID_LIST),
        "given_name": ("given_name", pl.String()),
        "middle_name": ("middle_name", pl.String()),
        "family_name": ("family_name", pl.String()),
        "birth_date": ("birth_date", pl.Date()),
        "sex": ("sex", pl.String()),
        "ssn": ("ssn", pl.String()),
        "address_line": ("address_line", pl.String()),
        "address_city": ("address_city", pl.String()),
        "address_state": ("address_state", pl.String()),
        "address_postal_code": ("address_postal_code", pl.String()),
        "phone": ("phone", pl.String()),
        "email": ("email", pl.String()),
    },
    "encounters": {
        "source_surface": ("surface", pl.String()),
        "source_id": ("source_id", pl.String()),
        "patient_source_id": ("patient_source_id", pl.String()),
        "class": ("encounter_class", pl.String()),
        "type_code": ("type_code", pl.String()),
        "type_system": ("type_system", pl.String()),
        "type_display": ("type_display", pl.String()),
        "status": ("status", pl.String()),
        "start_at": ("start_at", _TS),
        "end_at": ("end_at", _TS),
        "location": ("location", pl.String()),
        "attending_provider_id": ("attending_provider_id", pl.String()),
        "attending_provider_name": ("attending_provider_name", pl.String()),
        "reason": ("reason", pl.String()),
    },
    "results": {
        "source_surface": ("surface", pl.String()),
        "source_id": ("source_id", pl.String()),
        "patient_source_id": ("patient_source_id", pl.String()),
        "order_id": ("order_id", pl.String()),
        "code": ("code", pl.String()),
        "code_system": ("code_system", pl.String()),
        "display": ("display", pl.String()),
        "value_num": ("value_num", pl.Float64()),
        "value_text": ("value_text", pl.String()),
        "unit": ("unit", pl.String()),
        "reference_low": ("reference_low", pl.Float64()),
        "reference_high": ("reference_high", pl.Float64()),
        "reference_text": ("reference_text", pl.String()),
        "abnormal_flag": ("abnormal_flag", pl.String()),
        "status": ("status", pl.String()),
        "effective_at": ("effective_at", _TS),
        "value_type": ("value_type", pl.String()),
        "value_code": ("value_code", pl.String()),
        "value_code_system": ("value_code_system", pl.String()),
        "value_code_display": ("value_code_display", pl.String()),
    },
    "appointments": {
        "source_surface": ("surface", pl.String()),
        "source_id": ("source_id", pl.String()),
        "patient_source_id": ("patient_source_id", pl.String()),
        "status": ("status", pl.String()),
        "start_at": ("start_at", _TS),
        "end_at": ("end_at", _TS),
        "duration_min": ("duration_min", pl.Int32()),
        "type_code": ("type_code", pl.String()),
        "type_display": ("type_display", pl.String()),
        "location": ("location", pl.String()),
        "provider_id": ("provider_id", pl.String()),
        "provider_name": ("provider_name", pl.String()),
        "reason": ("reason", pl.String()),
    },
}


_ARROW: Final[dict[pl.DataType, pa.DataType]] = {
    pl.String(): pa.large_string(),
    pl.Float64(): pa.float64(),
    pl.Int32(): pa.int32(),
    pl.Int64(): pa.int64(),
    pl.Date(): pa.date32(),
    _TS: pa.timestamp("us", tz="UTC"),
    _ID_LIST: pa.large_list(pa.struct([("system", pa.large_string()), ("value", pa.large_string())])),
}


def _with_components(results: pl.DataFrame, versions: list[Version]) -> pl.DataFrame:
    """``results`` plus one row per component of a panel, as the warehouse holds them: keyed
    '<panel source_id>/component/<i>', with ``parent_source_id`` naming the panel, the panel's
    patient, order, status and times, and the component's own code, value and unit."""
    rows = []
    for v in versions:
        r = v.record
        assert isinstance(r, Result)
        for i, c in enumerate(r.components or ()):
            rows.append(
                {
                    "source_surface": r.surface,
                    "source_id": f"{r.source_id}/component/{i}",
                    "parent_source_id": r.source_id,
                    "code": c["code"],
                    "display": c["display"],
                    "value_num": c["value_num"],
                    "unit": c["unit"],
                    "value_type": "quantity",
                }
            )
    parents = results.with_columns(pl.lit(None, dtype=pl.String).alias("parent_source_id"))
    if not rows:
        return parents
    inherited = [
        "patient_source_id",
        "order_id",
        "code_system",
        "status",
        "effective_at",
        "last_updated",
        "version_id",
    ]
    parts = pl.DataFrame(rows).join(
        parents.select(pl.col("source_surface"), pl.col("source_id").alias("parent_source_id"), *inherited),
        on=["source_surface", "parent_source_id"],
    )
    return pl.concat([parents, parts], how="diagonal_relaxed").select(parents.columns)


# The results truth in the unified table's column order, with the value columns no sandbox record
# fills (they stay null in the lake too): the schema minus ``*_source`` and ``source_updated_at``.
_RESULT_ORDER: Final[dict[str, pl.DataType]] = {
    "source_surface": pl.String(),
    "source_id": pl.String(),
    "patient_source_id": pl.String(),
    "order_id": pl.String(),
    "parent_source_id": pl.String(),
    "member_source_ids": pl.List(pl.String()),
    "code": pl.String(),
    "code_system": pl.String(),
    "display": pl.String(),
    "value_type": pl.String(),
    "value_num": pl.Float64(),
    "value_comparator": pl.String(),
    "value_text": pl.String(),
    "value_code": pl.String(),
    "value_code_system": pl.String(),
    "value_code_display": pl.String(),
    "value_low": pl.Float64(),
    "value_high": pl.Float64(),
    "value_denominator": pl.Float64(),
    "value_at": _TS,
    "value_end_at": _TS,
    "absent_reason": pl.String(),
    "unit": pl.String(),
    "reference_low": pl.Float64(),
    "reference_high": pl.Float64(),
    "reference_text": pl.String(),
    "abnormal_flag": pl.String(),
    "status": pl.String(),
    "effective_at": _TS,
    "last_updated": _TS,
    "version_id": pl.Int64(),
}


def _result_columns(results: pl.DataFrame) -> pl.DataFrame:
    return results.select(
        (pl.col(c) if c in results.columns else pl.lit(None)).cast(dtype).alias(c)
        for c, dtype in _RESULT_ORDER.items()
    )


def truth_frames(
    store: Store,
    persons: dict[str, Person],
    patients_of: dict[str, list[tuple[Surface, str]]],
    groups: dict[str, list[str]],
) -> dict[str, pl.DataFrame]:
    """The truth frames ``World.truth`` returns, from the world's store and its person maps."""
    # Arrow converts Python columns (datetimes above all) far faster than polars' any-value path.
    out: dict[str, pl.DataFrame] = {}
    for kind, columns in _TRUTH.items():
        versions = [v for surface in SURFACES for v in store.query(kind, surface)]
        attrs = [attr for attr, _ in columns.values()]
        values = list(zip(*map(operator.attrgetter(*attrs), (v.record for v in versions)), strict=True))
        if not values:
            values = [() for _ in attrs]
        arrays: dict[str, pa.Array] = {}
        for (column, (attr, dtype)), column_values in zip(columns.items(), values, strict=True):
            if attr == "identifiers":
                column_values = tuple([(i.system, i.value) for i in ids] for ids in column_values)
            arrays[column] = pa.array(column_values, type=_ARROW[dtype])
        arrays["last_updated"] = pa.array([v.last_updated for v in versions], type=_ARROW[_TS])
        arrays["version_id"] = pa.array([v.version_id for v in versions], type=pa.int64())
        schema = {c: t for c, (_, t) in columns.items()} | {"last_updated": _TS, "version_id": pl.Int64()}
        frame = pl.from_arrow(pa.table(arrays))
        assert isinstance(frame, pl.DataFrame)
        out[kind] = frame.cast(schema)  # type: ignore[arg-type]
        if kind == "results":
            out[kind] = _result_columns(_with_components(out[kind], versions))
        if kind == "encounters":
            # A FHIR provider sent by name only (``provider_form``) has no id to load.
            display_only = pl.Series(
                [
                    v.record.surface == "fhir" and provider_form(v.record.source_id) == "display"
                    for v in versions
                ],
                dtype=pl.Boolean,
            )
            frame = out[kind]
            out[kind] = frame.with_columns(
                pl.when(display_only & pl.col("attending_provider_name").is_not_null())
                .then(None)
                .otherwise(pl.col("attending_provider_id"))
                .alias("attending_provider_id")
            )
    rows = [(pid, surface, sid) for pid, patients in patients_of.items() for surface, sid in patients]
    out["persons"] = pl.DataFrame(
        rows,
        schema={"person_id": pl.String(), "surface": pl.String(), "source_patient_id": pl.String()},
        orient="row",
    )
    out["hard_groups"] = pl.DataFrame(
        [(gid, pid, persons[pid].hard_group) for gid, members in groups.items() for pid in members],
        schema={"group_id": pl.String(), "person_id": pl.String(), "hard_group": pl.String()},
        orient="row",
    )
    noisy = [
        (v.record.surface, v.record.source_id, v.record.person_id, list(v.record.noise))  # type: ignore[union-attr]
        for surface in SURFACES
        for v in store.query("patients", surface)
    ]
    out["noise"] = pl.DataFrame(
        noisy,
        schema={
            "source_surface": pl.String(),
            "source_id": pl.String(),
            "person_id": pl.String(),
            "noise": pl.List(pl.String()),
        },
        orient="row",
    )
    return out
