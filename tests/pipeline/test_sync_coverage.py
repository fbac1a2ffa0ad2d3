"""A pulled sync leaves the same trail as a captured load: field coverage per landed day, the load
assets' metadata naming the top unmapped paths, and every row reaching its source page from SQL.

One real two-day sync against the sandbox on loopback through Dagster (all assets).
"""

import datetime as dt
import warnings
from pathlib import Path

import dagster as dg
import pytest

from assets import all_assets
from resources import all_resources
from resources.warehouse import Warehouse
from sandbox.server import serve_in_thread

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RANGE_TAGS = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
TABLES = ("patients", "encounters", "results", "appointments")


def test_sync_counts_paths_and_rows_reach_their_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    today = dt.datetime.now(dt.UTC).date()
    first, last = today - dt.timedelta(days=2), today - dt.timedelta(days=1)
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path))
    monkeypatch.setenv("REDOX_BUDGET_PATH", str(tmp_path / "budget.sqlite"))
    monkeypatch.delenv("REDOX_ETL_LAKE", raising=False)
    with serve_in_thread(
        state_dir=tmp_path / "sandbox", patients=40, seed=7, start=first, end=last, rate_limit=None
    ) as running:
        monkeypatch.setenv("REDOX_SANDBOX_CREDENTIALS", str(running.credentials_path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = dg.materialize(
                all_assets,
                resources=all_resources(),
                instance=dg.DagsterInstance.ephemeral(),
                tags=dict(zip(RANGE_TAGS, (first.isoformat(), last.isoformat()), strict=True)),
            )
    assert result.success
    metadata = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    for table in TABLES:
        assert "top_unmapped_paths" in metadata[table]
        assert metadata[table]["unmapped_paths"].value == len(
            Warehouse()
            .query(
                "SELECT DISTINCT surface, path FROM field_coverage WHERE entity = ? AND NOT mapped", [table]
            )
            .rows()
        )
    warehouse = Warehouse()
    covered = warehouse.query(
        'SELECT DISTINCT surface, entity, "partition" FROM field_coverage WHERE "partition" LIKE \'day=%\''
    )
    assert covered.height >= 6  # both surfaces' clinical streams, at least one day each
    for table in TABLES:
        rows = warehouse.query(
            f"SELECT count(*) AS n, count(p.raw_ref) AS reached FROM {table} t"
            " LEFT JOIN source_pages p ON p.raw_ref = t.source_ref"
        ).row(0, named=True)
        assert rows["n"] > 0 and rows["reached"] == rows["n"], (table, rows)
