"""Warehouse.write_derived on a real DuckLake: several derived tables and views as one snapshot."""

from pathlib import Path

import duckdb
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from resources.warehouse import Warehouse
from tests.lake_frames import snapshots

pytestmark = pytest.mark.integration


@pytest.fixture
def wh(tmp_path: Path) -> Warehouse:
    warehouse = Warehouse(lake_dir=str(tmp_path / "lake"))
    warehouse.ensure_tables()
    return warehouse


def _snapshots(wh: Warehouse) -> int:
    return snapshots(wh).height


def test_tables_appends_and_views_commit_as_one_snapshot(wh: Warehouse) -> None:
    a = pl.DataFrame({"k": ["x", "y"], "v": [1, 2]})
    events = pl.DataFrame({"k": ["x"], "what": ["create"]})
    before = _snapshots(wh)
    snapshot = wh.write_derived(
        run_id="run-1",
        message="derive",
        replace={"derived_a": a},
        append={"derived_events": events, "derived_inbox": pl.DataFrame(schema={"note": pl.String()})},
        views={
            "derived_view": "SELECT a.k, a.v, e.what FROM derived_a AS a LEFT JOIN derived_events AS e USING (k)"
        },
    )
    assert _snapshots(wh) == before + 1
    assert snapshot == snapshots(wh)["snapshot_id"].max()
    assert wh.query("SELECT count(*) FROM derived_inbox").item() == 0  # created empty
    wh.write_derived(
        run_id="run-2", message="derive", replace={"derived_a": a.head(1)}, append={"derived_events": events}
    )
    assert_frame_equal(wh.query("SELECT * FROM derived_a"), a.head(1))
    assert wh.query("SELECT count(*) FROM derived_events").item() == 2  # appended, not replaced
    assert wh.query("SELECT k, v, what FROM derived_view").rows() == [("x", 1, "create"), ("x", 1, "create")]


def test_a_failed_write_leaves_nothing_behind(wh: Warehouse) -> None:
    wh.write_derived(run_id="run-1", message="derive", replace={"derived_a": pl.DataFrame({"k": ["x"]})})
    before = _snapshots(wh)
    with pytest.raises(duckdb.Error, match=r"(?i)not_a_table"):
        wh.write_derived(
            run_id="run-2",
            message="derive",
            replace={"derived_a": pl.DataFrame({"k": ["y", "z"]})},
            views={"derived_view": "SELECT * FROM not_a_table"},
        )
    assert _snapshots(wh) == before
    assert wh.query("SELECT k FROM derived_a").rows() == [("x",)]


def test_loaded_tables_and_odd_names_are_refused(wh: Warehouse) -> None:
    frame = pl.DataFrame({"k": ["x"]})
    with pytest.raises(ValueError, match="loaded table"):
        wh.write_derived(run_id="r", message="m", append={"patients": frame})
    with pytest.raises(ValueError, match="plain identifier"):
        wh.write_derived(run_id="r", message="m", views={"a; DROP TABLE patients": "SELECT 1"})
    with pytest.raises(ValueError, match="once"):
        wh.write_derived(run_id="r", message="m", replace={"t": frame}, views={"t": "SELECT 1"})
