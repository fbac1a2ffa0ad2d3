"""End to end: sandbox on loopback -> real Dagster run -> DuckLake tables equal the sandbox's truth.

Then the sandbox's clock moves on (new visits, reschedules, corrections, entered-in-error records),
the same days plus the new ones are synced again, and the tables must equal the new truth.

The sandbox sends a few Data Model VisitNumbers and Order IDs for two patients' records: both
records are in the lake (the truth has both), and the load assets' metadata counts those ids.
"""

import datetime as dt
import warnings

import dagster as dg
import polars as pl
import pytest

from assets import all_assets
from resources import all_resources
from sandbox.server import serve_in_thread
from tests.pipeline.truth import KEY
from tests.pipeline.truth import assert_equal as _assert_equal
from tests.pipeline.truth import expected as _expected

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _sync(first: dt.date, last: dt.date) -> int:
    """Materialize every asset over the days; returns the ids shared across patients the load
    assets counted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dg.materialize(
            all_assets,
            resources=all_resources(),
            instance=dg.DagsterInstance.ephemeral(),
            tags={
                "dagster/asset_partition_range_start": first.isoformat(),
                "dagster/asset_partition_range_end": last.isoformat(),
            },
        )
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks), [c.check_name for c in checks if not c.passed]
    counted = 0
    for event in result.get_asset_materialization_events():
        value = event.materialization.metadata.get("ids_shared_across_patients")
        if isinstance(value, dg.IntMetadataValue) and value.value is not None:
            counted += value.value
    return counted


def _shared(want: dict[str, pl.DataFrame]) -> int:
    """Data Model ids the expected lake holds for two patients or more (ids as sent: the key less
    its patient scope, results by order)."""
    n = 0
    for table in ("encounters", "appointments", "results"):
        rows = want[table].filter(pl.col("source_surface") == "datamodel").select(*KEY, "patient_source_id")
        sent = pl.col("source_id").str.slice(pl.col("patient_source_id").str.len_chars() + 1)
        if table == "results":
            sent = sent.str.split("|").list.first()
        shared = rows.group_by(sent.alias("sent")).agg(pl.col("patient_source_id").n_unique().alias("n"))
        n += shared.filter(pl.col("n") > 1).height
    return n


def test_sync_then_incremental_equals_truth(tmp_path, monkeypatch):
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path))
    monkeypatch.setenv("REDOX_BUDGET_PATH", str(tmp_path / "budget.sqlite"))
    today = dt.datetime.now(dt.UTC).date()
    first, last = today - dt.timedelta(days=9), today - dt.timedelta(days=5)
    with serve_in_thread(
        state_dir=tmp_path / "sandbox", patients=120, seed=11, start=first, end=last, rate_limit=None
    ) as running:
        monkeypatch.setenv("REDOX_SANDBOX_CREDENTIALS", str(running.credentials_path))
        counted = _sync(first, last)
        want = _expected(running.world.truth(), first, last)
        _assert_equal(want, first, last)
        # Both records of an id sent for two patients are in the lake (assert_equal), and counted.
        assert _shared(want) > 0
        assert counted > 0

        changes = running.world.advance(dt.timedelta(days=2))
        assert sum(changes.values()) > 0
        new_last = last + dt.timedelta(days=2)
        _sync(first, new_last)
        _assert_equal(_expected(running.world.truth(), first, new_last), first, new_last)
