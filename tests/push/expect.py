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
from tests.pipeline.truth import COMPARED, KEY


def pushed_keys(ledger: list[dict[str, Any]], truth: dict[str, pl.DataFrame]) -> dict[str, pl.DataFrame]:
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


def expected_rows(ledger: list[dict[str, Any]], truth: dict[str, pl.DataFrame], table: str) -> pl.DataFrame:
    want = truth[table].join(pushed_keys(ledger, truth)[table], on=KEY).select(KEY + COMPARED[table])
    if table == "encounters":
        # Redox's Data Model visits carry no end time (as in the pull).
        want = want.with_columns(
            pl.when(pl.col("source_surface") == "fhir").then(pl.col("end_at")).alias("end_at")
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
        assert want.height == keys[table].height, f"{table}: a pushed key is missing from truth"
        if not only_pushed:
            got = got.join(keys[table], on=KEY)
        assert got.height == want.height, f"{table}: {want.height - got.height} pushed record(s) missing"
        assert_frame_equal(got.sort(KEY), want.sort(KEY), check_dtypes=False, check_exact=False)
