"""Component rows follow their record's version in a real DuckLake: a newer Observation with fewer
components leaves exactly its own components current, and an older version arriving late neither
replaces the newer one nor brings its extra components back."""

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

import schema
from resources.warehouse import Warehouse
from resources.warehouse.merge import MergeStats

DAY = dt.date(2024, 3, 10)
V1 = dt.datetime(2024, 3, 10, 8, tzinfo=dt.UTC)
V2 = V1 + dt.timedelta(hours=1)

pytestmark = pytest.mark.usefixtures("isolated_lake_env")


def _observation(source_id: str, stamp: dt.datetime, parts: int, *, patient: str = "p1") -> pl.DataFrame:
    """A record's row and ``parts`` component rows, as the FHIR normalizer emits them."""
    ids = [source_id, *(f"{source_id}/component/{i}" for i in range(parts))]
    frame = pl.DataFrame(
        {
            "source_surface": ["fhir"] * len(ids),
            "source_id": ids,
            "patient_source_id": [patient] * len(ids),
            "parent_source_id": [None, *([source_id] * parts)],
            "code": ["85354-9", *(f"part-{i}" for i in range(parts))],
            "value_num": [None, *(float(100 + i) for i in range(parts))],
            "source_updated_at": [stamp] * len(ids),
        },
        schema_overrides={"source_updated_at": schema.UTC_TS, "parent_source_id": pl.String()},
    )
    return schema.conform(frame.lazy(), "results").collect()


def _current(wh: Warehouse) -> pl.DataFrame:
    return wh.query("SELECT source_id, parent_source_id, source_updated_at FROM results ORDER BY source_id")


def _merge(wh: Warehouse, frame: pl.DataFrame, run: str) -> MergeStats:
    return wh.merge("results", frame, partition_day=DAY, run_id=run, source_surface="fhir")


def test_newer_version_with_fewer_components_leaves_only_its_own(tmp_path: Path) -> None:
    wh = Warehouse(lake_dir=str(tmp_path / "lake"))
    first = _merge(wh, pl.concat([_observation("bp-1", V1, 3), _observation("other", V1, 3)]), "r1")
    assert first.inserted == 8 and first.components_removed == 0

    second = _merge(wh, _observation("bp-1", V2, 2), "r2")
    lake = _current(wh)
    mine = lake.filter(pl.col("parent_source_id") == "bp-1")
    assert mine["source_id"].to_list() == ["bp-1/component/0", "bp-1/component/1"]
    assert set(mine["source_updated_at"]) == {V2}
    assert second.updated == 3 and second.components_removed == 1
    assert second.as_metadata()["components_removed"] == 1
    # Another record's components are not touched.
    assert lake.filter(pl.col("parent_source_id") == "other").height == 3

    # The first version arriving late (a backfill of an older day) loses, components included: the
    # component it has beyond the newer version's does not come back.
    late = _merge(wh, _observation("bp-1", V1, 3), "r3")
    assert late.inserted == 0 and late.updated == 0 and late.ignored_older == 4
    assert late.components_removed == 0
    assert _current(wh).filter(pl.col("parent_source_id") == "bp-1").height == 2

    # A rerun of the same version rewrites it and removes nothing.
    again = _merge(wh, _observation("bp-1", V2, 2), "r4")
    assert again.updated == 3 and again.components_removed == 0
    assert _current(wh).height == 3 + 4


def test_a_version_with_more_components_adds_them(tmp_path: Path) -> None:
    wh = Warehouse(lake_dir=str(tmp_path / "lake"))
    _merge(wh, _observation("bp-1", V1, 1), "r1")
    grown = _merge(wh, _observation("bp-1", V2, 3), "r2")
    assert (grown.inserted, grown.updated, grown.components_removed) == (2, 2, 0)
    assert _current(wh).filter(pl.col("parent_source_id") == "bp-1").height == 3
