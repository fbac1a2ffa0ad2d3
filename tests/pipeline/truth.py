"""What the lake must hold after a sync of a sandbox window, derived from the sandbox's own truth.

Shared by the end-to-end tests (tests/pipeline, tests/reliability) so they all compare the same
columns the same way.
"""

import datetime as dt

import polars as pl
from polars.testing import assert_frame_equal

from resources.warehouse import Warehouse
from sandbox.datamodel_render import REUSED_PART

KEY = ["source_surface", "source_id"]
COMPARED = {
    "patients": ["given_name", "family_name", "birth_date", "sex", "address_postal_code"],
    "encounters": [
        "patient_source_id",
        "class",
        "status",
        "start_at",
        "end_at",
        "type_system",
        "attending_provider_id",
        "attending_provider_name",
    ],
    "results": [
        "patient_source_id",
        "parent_source_id",
        "code",
        "code_system",
        "value_type",
        "value_num",
        "value_text",
        "value_code",
        "value_code_system",
        "value_code_display",
        "unit",
        "abnormal_flag",
        "status",
        "effective_at",
    ],
    "appointments": ["patient_source_id", "status", "start_at", "end_at", "duration_min"],
}
CLINICAL_TIME = {"encounters": "start_at", "results": "effective_at", "appointments": "start_at"}


def bounds(first: dt.date, last: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """The window's half-open UTC range: midnight of ``first`` to midnight after ``last``."""
    lo = dt.datetime.combine(first, dt.time(), tzinfo=dt.UTC)
    hi = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return lo, hi


def referenced(clinical: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """(source_surface, source_id) of every patient the given clinical rows point at."""
    return pl.concat(
        [
            f.select("source_surface", pl.col("patient_source_id").alias("source_id"))
            for f in clinical.values()
        ]
    ).unique()


def scope_datamodel_ids(frame: pl.DataFrame) -> pl.DataFrame:
    """Data Model ids are unique only within a source system: the lake keys those clinical records
    by their patient too ('<patient_source_id>/<id>'), as transforms/datamodel scopes them. The id
    is the one the sandbox sends: its store key less the part that makes a reused id unique there
    ('<sent id>~<own id>', sandbox/population/records.py)."""
    sent = pl.col("source_id").str.replace_all(REUSED_PART, "")
    return frame.with_columns(
        pl.when(pl.col("source_surface") == "datamodel")
        .then(pl.concat_str([pl.col("patient_source_id"), sent], separator="/"))
        .otherwise(pl.col("source_id"))
        .alias("source_id")
    )


def expected(truth: dict[str, pl.DataFrame], first: dt.date, last: dt.date) -> dict[str, pl.DataFrame]:
    """Truth rows a sync of [first, last] must load: the window's clinical records, their patients."""
    lo, hi = bounds(first, last)
    out = {
        table: truth[table].filter(pl.col(column).is_between(lo, hi, closed="left"))
        for table, column in CLINICAL_TIME.items()
    }
    out["patients"] = truth["patients"].join(referenced(out), on=KEY)
    for table in CLINICAL_TIME:
        out[table] = scope_datamodel_ids(out[table])
    # Redox's VisitQueryResponse has no end of visit, visit type or attending provider: the Data
    # Model surface cannot carry them.
    out["encounters"] = out["encounters"].with_columns(
        pl.when(pl.col("source_surface") == "fhir").then(pl.col(c)).alias(c)
        for c in ("end_at", "type_system", "attending_provider_id", "attending_provider_name")
    )
    return out


def lake_rows(warehouse: Warehouse, table: str, first: dt.date, last: dt.date) -> pl.DataFrame:
    """The compared columns of ``table`` as the lake holds them, clinical tables limited to the window."""
    key_and_columns = KEY + COMPARED[table]
    where = ""
    if table in CLINICAL_TIME:
        where = f" WHERE {CLINICAL_TIME[table]} >= ? AND {CLINICAL_TIME[table]} < ?"
    return warehouse.query(
        f"SELECT {', '.join(key_and_columns)} FROM {table}{where}",
        list(bounds(first, last)) if where else None,
    )


def assert_equal(want: dict[str, pl.DataFrame], first: dt.date, last: dt.date) -> None:
    """Every table holds exactly ``want`` (compared columns), each key once."""
    warehouse = Warehouse()
    for table, columns in COMPARED.items():
        got = lake_rows(warehouse, table, first, last)
        wanted = want[table].select(KEY + columns)
        assert got.height == got.select(KEY).unique().height, f"{table}: duplicate keys"
        assert_frame_equal(got.sort(KEY), wanted.sort(KEY), check_dtypes=False, check_exact=False)
