"""A Data Model patient named by identifiers only must never blank that patient's full record.

Results replies embed ``Patient.Identifiers`` and no demographics. The load treats such a row as a
pointer: dropped when the lake holds the patient, a stand-in (no timestamp) when it does not, so the
full record wins whichever day is loaded first. Real DuckLake, real landed pages (Redox's own
documentation examples), the load asset's own ``load_day``.
"""

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from assets.warehouse import Tally, load_day
from resources.landing import LandingZone, RawPage
from resources.warehouse import Warehouse

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "redox-datamodel"
FULL_DAY, REF_DAY = dt.date(2023, 2, 27), dt.date(2023, 3, 1)
MRN = "0000000001"


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _land(zone: LandingZone, entity: str, day: dt.date, body: dict[str, Any]) -> None:
    page = RawPage(json.dumps(body).encode(), f"test {entity}", dt.datetime.now(dt.UTC))
    zone.write("datamodel", entity, f"day={day.isoformat()}", [page], run_id="test")


@pytest.fixture
def lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Warehouse, LandingZone]:
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path / "home"))
    zone = LandingZone(tmp_path / "lake")
    full = _fixture("patientsearch_response")
    _land(zone, "patients", FULL_DAY, full)
    results = copy.deepcopy(_fixture("results_queryresponse"))
    # Later than the PatientSearch reply: newest-wins alone would let this pointer replace the record.
    results["Meta"]["EventDateTime"] = "2023-03-01T09:00:00.000Z"
    for order in results["Orders"]:
        order["Patient"] = {"Identifiers": [{"ID": MRN, "IDType": "MR"}]}
    _land(zone, "results", REF_DAY, results)
    warehouse = Warehouse(lake_dir=str(tmp_path / "lake"))
    warehouse.ensure_tables()
    return warehouse, zone


def _load(warehouse: Warehouse, zone: LandingZone, day: dt.date) -> Tally:
    tally = Tally()
    load_day(warehouse, zone, surface="datamodel", entity="patients", day=day, run_id="r", tally=tally)
    assert tally.accounted, tally
    return tally


def _stored(warehouse: Warehouse) -> dict[str, Any]:
    rows = warehouse.query(
        "SELECT given_name, family_name, birth_date, source_updated_at FROM patients WHERE source_id = ?",
        [MRN],
    )
    assert rows.height == 1
    return rows.row(0, named=True)


def test_a_later_pointer_leaves_the_full_record(lake: tuple[Warehouse, LandingZone]) -> None:
    warehouse, zone = lake
    _load(warehouse, zone, FULL_DAY)
    tally = _load(warehouse, zone, REF_DAY)
    assert tally.known_references == 1 and tally.loaded == 0
    row = _stored(warehouse)
    assert (row["given_name"], row["family_name"]) == ("Timothy", "Bixby")
    assert row["birth_date"] == dt.date(2008, 1, 6)


def test_a_stand_in_gives_way_to_an_older_full_record(lake: tuple[Warehouse, LandingZone]) -> None:
    warehouse, zone = lake
    # A backfill may load the later day first: the pointer stands in, without a timestamp.
    tally = _load(warehouse, zone, REF_DAY)
    assert tally.loaded == 1 and tally.known_references == 0
    stand_in = _stored(warehouse)
    assert stand_in["family_name"] is None and stand_in["source_updated_at"] is None
    _load(warehouse, zone, FULL_DAY)
    row = _stored(warehouse)
    assert (row["given_name"], row["family_name"]) == ("Timothy", "Bixby")
    assert row["source_updated_at"] == dt.datetime(2023, 2, 27, 22, 9, 3, 585000, tzinfo=dt.UTC)
