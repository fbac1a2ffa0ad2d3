"""A day's FHIR search is cut into disjoint, adjacent slices that together are the whole day, as many
as the pages of a neighbouring landed day call for; a Data Model day asks as many windows as its
nearest landed neighbour took."""

import datetime as dt
import itertools

import pytest

from assets.extract import DM_RECORDS_PER_WINDOW, _reply_records, _windows_for, day_slices
from assets.partitions import partition_folder
from resources.landing import LandingZone, RawPage
from resources.redox import RedoxSettings
from transforms.streams import stream

START = dt.datetime(2026, 3, 2, tzinfo=dt.UTC)
END = START + dt.timedelta(days=1)


@pytest.mark.parametrize("count", [1, 3, 4, 7, 96])
def test_slices_cover_the_day_once(count):
    windows = day_slices(START, END, count)
    assert len(windows) == count
    assert windows[0][0] == START and windows[-1][1] == END
    assert all(hi == lo for (_, hi), (lo, _) in itertools.pairwise(windows))
    assert all(lo.microsecond == 0 for lo, _ in windows)


def _land(zone: LandingZone, surface: str, entity: str, day: dt.date, pages: int, records: int = 0) -> None:
    now = dt.datetime.now(dt.UTC)
    zone.write(
        surface,
        entity,
        partition_folder(day),
        [RawPage(b"{}", "test", now) for _ in range(pages)],
        run_id="test",
        extra={"records": records} if records else {},
    )


DAY = dt.date(2026, 3, 2)


@pytest.mark.parametrize(("landed", "want"), [(None, 1), (2, 1), (9, 2), (40, 4), (400, 4)])
def test_fhir_slices_follow_the_pages_a_neighbouring_day_held(tmp_path, landed, want):
    zone = LandingZone(tmp_path)
    if landed is not None:
        _land(zone, "fhir", "results", DAY - dt.timedelta(days=3), landed)
    settings = RedoxSettings(base_url="http://sandbox.invalid", fhir_day_slices=4)
    assert _windows_for(zone, stream("fhir", "results"), DAY, settings) == want


def test_datamodel_windows_are_what_the_nearest_day_took(tmp_path):
    zone = LandingZone(tmp_path)
    settings = RedoxSettings(base_url="http://sandbox.invalid")
    assert _windows_for(zone, stream("datamodel", "results"), DAY, settings) == 1
    _land(zone, "datamodel", "results", DAY + dt.timedelta(days=6), 5)
    _land(zone, "datamodel", "results", DAY + dt.timedelta(days=1), 3)
    # The nearest landed day decides, not the largest within reach.
    assert _windows_for(zone, stream("datamodel", "results"), DAY, settings) == 3


def test_datamodel_windows_follow_the_records_the_nearest_day_held(tmp_path):
    zone = LandingZone(tmp_path)
    settings = RedoxSettings(base_url="http://sandbox.invalid")
    # Two pages (windows) of 21,000 results: a window per DM_RECORDS_PER_WINDOW instead.
    _land(zone, "datamodel", "results", DAY - dt.timedelta(days=1), 2, records=21_000)
    assert _windows_for(zone, stream("datamodel", "results"), DAY, settings) == -(
        -21_000 // DM_RECORDS_PER_WINDOW
    )
    # A quiet neighbour keeps the windows it took.
    _land(zone, "datamodel", "encounters", DAY - dt.timedelta(days=1), 1, records=500)
    assert _windows_for(zone, stream("datamodel", "encounters"), DAY, settings) == 1


def test_reply_records_counts_results_and_visits():
    assert _reply_records({"Orders": [{"Results": [{}, {}]}, {"Results": [{}]}, {}]}) == 3
    assert _reply_records({"Visits": [{}, {}]}) == 2
    # A VisitQuery reply nests its visits in their patients (its manifests once said 0 records).
    assert _reply_records({"Patients": [{"Visits": [{}, {}]}, {"Visits": [{}]}, {}]}) == 3
    assert _reply_records({"Meta": {}}) == 0
    assert _reply_records(None) == 0
