"""What the lake must hold after the push lane loaded a sandbox pusher's deliveries (from its ledger).

Pushed records: every (kind, surface, source_id) the ledger lists, at the sandbox's head version.
Patients also arrive embedded in Data Model event messages (the ``Patient`` beside a Visit or an
Order), so the Data Model patients those events name are expected too; a FHIR notification carries
only its focus resource.
"""

from typing import Any

import polars as pl
from polars.testing import assert_frame_equal

from resources.warehouse import Warehouse
from tests.pipeline.truth import COMPARED, KEY, scope_datamodel_ids


def _ledger_keys(ledger: list[dict[str, Any]], truth: dict[str, pl.DataFrame]) -> dict[str, pl.DataFrame]:
    """The ledger's keys as the sandbox names records (Data Model ids not yet scoped by patient)."""
    keys = pl.DataFrame(
        [{"kind": e["kind"], "source_surface": e["surface"], "source_id": e["source_id"]} for e in ledger],
        schema={"kind": pl.String, "source_surface": pl.String, "source_id": pl.String},
    ).unique()
    out = {table: keys.filter(pl.col("kind") == table).drop("kind") for table in COMPARED}
    embedded = pl.concat(
        [
            truth[table]
            .join(out[table], on=KEY)
            .filter(pl.col("source_surface") == "datamodel")
            .select("source_surface", pl.col("patient_source_id").alias("source_id"))
            for table in ("encounters", "results", "appointments")
        ]
    )
    out["patients"] = pl.concat([out["patients"], embedded]).unique()
    return out


def _truth_rows(ledger: list[dict[str, Any]], truth: dict[str, pl.DataFrame], table: str) -> pl.DataFrame:
    """Truth rows of the pushed records, with their lake keys; a pushed panel brings its components."""
    keys = _ledger_keys(ledger, truth)[table]
    rows = truth[table].join(keys, on=KEY)
    if table == "results" and "parent_source_id" in truth[table].columns:
        parts = truth[table].join(
            keys.rename({"source_id": "parent_source_id"}), on=["source_surface", "parent_source_id"]
        )
        rows = pl.concat([rows, parts]).unique(subset=KEY)
    return scope_datamodel_ids(rows) if table != "patients" else rows


def pushed_keys(ledger: list[dict[str, Any]], truth: dict[str, pl.DataFrame]) -> dict[str, pl.DataFrame]:
    return {table: _truth_rows(ledger, truth, table).select(KEY) for table in COMPARED}


def expected_rows(ledger: list[dict[str, Any]], truth: dict[str, pl.DataFrame], table: str) -> pl.DataFrame:
    want = _truth_rows(ledger, truth, table).select(KEY + COMPARED[table])
    if table == "encounters":
        # The sandbox renders a pushed Data Model visit as it renders VisitQuery's: no end of visit,
        # visit type or attending provider (as in the pull, tests/pipeline/truth.py).
        want = want.with_columns(
            pl.when(pl.col("source_surface") == "fhir").then(pl.col(c)).alias(c)
            for c in ("end_at", "type_system", "attending_provider_id", "attending_provider_name")
            if c in want.columns
        )
    return want


def assert_lake_equals_pushed(
    warehouse: Warehouse,
    truth: dict[str, pl.DataFrame],
    ledger: list[dict[str, Any]],
    *,
    only_pushed: bool = False,
) -> None:
    """Each table holds every pushed record once, equal to truth; with ``only_pushed``, nothing else."""
    keys = pushed_keys(ledger, truth)
    for table, columns in COMPARED.items():
        got = warehouse.query(f"SELECT {', '.join(KEY + columns)} FROM {table}")
        assert got.height == got.select(KEY).unique().height, f"{table}: duplicate keys"
        want = expected_rows(ledger, truth, table)
        missing = _ledger_keys(ledger, truth)[table].join(truth[table], on=KEY, how="anti")
        assert missing.is_empty(), f"{table}: a pushed key is missing from truth"
        if not only_pushed:
            got = got.join(keys[table], on=KEY)
        assert got.height == want.height, f"{table}: {want.height - got.height} pushed record(s) missing"
        assert_frame_equal(got.sort(KEY), want.sort(KEY), check_dtypes=False, check_exact=False)
