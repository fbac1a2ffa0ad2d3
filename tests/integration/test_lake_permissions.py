"""Everything under the lake that holds patient data, or values derived from it, is owner-only.

The SQLite catalog holds DuckLake's per-file min/max column statistics (e.g. the first and last
family name of each Parquet file); landed raw pages are whole patient records.
"""

import datetime as dt
import os
import stat
from pathlib import Path

import pytest

from resources.landing import LandingZone, RawPage
from resources.warehouse import Warehouse


def _group_or_other_bits(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode) & 0o077


def test_catalog_and_raw_pages_are_owner_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path / "home"))
    lake = tmp_path / "lake"
    zone = LandingZone(lake)
    page = RawPage(b'{"resourceType": "Bundle"}', "test", dt.datetime.now(dt.UTC))
    # The usual umask: files would be world-readable unless the code makes them owner-only.
    previous = os.umask(0o022)
    try:
        zone.write("fhir", "patients", "day=2026-01-01", [page], run_id="r")
        Warehouse(lake_dir=str(lake)).ensure_tables()
    finally:
        os.umask(previous)

    catalog = [p for p in lake.iterdir() if p.name.startswith("catalog.sqlite")]
    assert catalog, "no SQLite catalog was created"
    raw = [lake, lake / "raw", *sorted((lake / "raw").rglob("*"))]
    loose = [str(p.relative_to(tmp_path)) for p in [*catalog, *raw] if _group_or_other_bits(p)]
    assert not loose, f"readable by group or others: {loose}"
