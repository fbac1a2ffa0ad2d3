"""The sandbox store: versions, snapshot reads, filters and paging that survive concurrent writes."""

import dataclasses
import time
from datetime import UTC, date, datetime, timedelta

import pytest

from sandbox.model import Appointment, Encounter, Identifier, Patient, Result, bulk_constructor
from sandbox.store import Bounds, Store

T0 = datetime(2025, 6, 1, tzinfo=UTC)


def patient(sid: str, *identifiers: tuple[str, str]) -> Patient:
    return Patient(
        surface="fhir",
        source_id=sid,
        person_id=f"P-{sid}",
        identifiers=tuple(Identifier(s, v) for s, v in identifiers),
        given_name="Given",
        middle_name=None,
        family_name="Family",
        birth_date=date(1980, 1, 2),
        sex="female",
        ssn=None,
        address_line=None,
        address_city=None,
        address_state=None,
        address_postal_code=None,
        phone=None,
        email=None,
    )


def encounter(sid: str, start: datetime, *, patient_id: str = "p1", status: str = "finished") -> Encounter:
    return Encounter(
        surface="fhir",
        source_id=sid,
        patient_source_id=patient_id,
        encounter_class="ambulatory",
        type_code=None,
        type_system=None,
        type_display=None,
        status=status,
        start_at=start,
        end_at=None,
        location=None,
        attending_provider_id=None,
        attending_provider_name=None,
        reason=None,
    )


def appointment(sid: str, start: datetime, *, patient_id: str = "p1") -> Appointment:
    return Appointment(
        surface="datamodel",
        source_id=sid,
        patient_source_id=patient_id,
        status="booked",
        start_at=start,
        end_at=start + timedelta(minutes=30),
        duration_min=30,
        type_code=None,
        type_display=None,
        location=None,
        provider_id=None,
        provider_name=None,
        reason=None,
    )


def ids(versions: list) -> list[str]:
    return [v.record.source_id for v in versions]


# -- Bounds ---------------------------------------------------------------------------------------


def test_bounds_default_is_half_open() -> None:
    b = Bounds(T0, hi=T0 + timedelta(days=1))
    assert b.contains(T0)
    assert b.contains(T0 + timedelta(hours=23, minutes=59, seconds=59))
    assert not b.contains(T0 + timedelta(days=1))
    assert not b.contains(T0 - timedelta(microseconds=1))


def test_bounds_inclusiveness_and_open_ends() -> None:
    assert not Bounds(T0, lo_inclusive=False).contains(T0)
    assert Bounds(T0, lo_inclusive=False).contains(T0 + timedelta(microseconds=1))
    assert Bounds(hi=T0, hi_inclusive=True).contains(T0)
    assert Bounds(hi=T0, hi_inclusive=True).contains(datetime(1900, 1, 1, tzinfo=UTC))
    assert Bounds().contains(T0)
    # An aware instant in another zone compares by the instant, not the wall clock.
    other = T0.astimezone(__import__("zoneinfo").ZoneInfo("America/New_York"))
    assert Bounds(T0, hi=T0, hi_inclusive=True).contains(other)


def test_bounds_reject_naive_datetimes() -> None:
    with pytest.raises(ValueError):
        Bounds(datetime(2025, 1, 1))


# -- writes ---------------------------------------------------------------------------------------


def test_put_numbers_versions_and_stamps_the_clock() -> None:
    store = Store(T0)
    v1 = store.put("encounters", encounter("e1", T0))
    assert (v1.seq, v1.version_id, v1.last_updated) == (1, 1, T0)
    store.clock = T0 + timedelta(hours=1)
    v2 = store.put("encounters", encounter("e1", T0, status="cancelled"))
    assert (v2.seq, v2.version_id, v2.last_updated) == (2, 2, T0 + timedelta(hours=1))
    assert store.head_seq == 2
    assert [v.version_id for v in store.history("encounters", "fhir", "e1")] == [1, 2]


def test_put_keeps_last_updated_strictly_increasing_per_record() -> None:
    store = Store(T0)
    store.put("encounters", encounter("e1", T0))
    again = store.put("encounters", encounter("e1", T0, status="cancelled"))
    assert again.last_updated == T0 + timedelta(milliseconds=1)
    earlier = store.put("encounters", encounter("e1", T0), at=T0 - timedelta(days=1))
    assert earlier.last_updated == T0 + timedelta(milliseconds=2)
    # Another record at the same clock is not bumped.
    assert store.put("encounters", encounter("e2", T0)).last_updated == T0


def test_put_checks_kind_and_awareness() -> None:
    store = Store(T0)
    with pytest.raises(ValueError):
        store.put("results", encounter("e1", T0))
    with pytest.raises(ValueError):
        store.put("encounters", encounter("e1", T0), at=datetime(2025, 1, 1))
    with pytest.raises(ValueError):
        Store(datetime(2025, 1, 1))


def test_log_is_every_version_in_write_order() -> None:
    store = Store(T0)
    for i in range(5):
        store.put("encounters", encounter(f"e{i % 2}", T0))
    assert [v.seq for v in store.log()] == [1, 2, 3, 4, 5]
    assert [v.seq for v in store.log(after_seq=2, upto_seq=4)] == [3, 4]


# -- snapshot reads -------------------------------------------------------------------------------


def test_current_as_of_sees_the_version_of_that_time() -> None:
    store = Store(T0)
    store.put("encounters", encounter("e1", T0))
    store.put("encounters", encounter("e1", T0, status="cancelled"))
    assert store.current("encounters", "fhir", "e1").record.status == "cancelled"  # type: ignore[union-attr]
    assert store.current("encounters", "fhir", "e1", as_of_seq=1).record.status == "finished"  # type: ignore[union-attr]
    assert store.current("encounters", "fhir", "e1", as_of_seq=0) is None
    assert store.current("encounters", "datamodel", "e1") is None
    assert store.current("encounters", "fhir", "nope") is None


def test_query_as_of_ignores_later_versions_and_records() -> None:
    store = Store(T0)
    for i in range(10):
        store.put("encounters", encounter(f"e{i:02d}", T0 + timedelta(hours=i)))
    snapshot = store.head_seq
    before = store.query("encounters", "fhir", as_of_seq=snapshot)
    store.put("encounters", encounter("e03", T0 + timedelta(hours=3), status="cancelled"))
    store.put("encounters", encounter("e00a", T0))
    after = store.query("encounters", "fhir", as_of_seq=snapshot)
    assert ids(after) == ids(before) == [f"e{i:02d}" for i in range(10)]
    assert all(v.version_id == 1 for v in after)
    head = store.query("encounters", "fhir")
    assert "e00a" in ids(head)
    assert next(v for v in head if v.record.source_id == "e03").record.status == "cancelled"  # type: ignore[union-attr]


def test_query_window_follows_the_as_of_version_of_a_moved_record() -> None:
    store = Store(T0)
    day1, day2 = (
        Bounds(T0, hi=T0 + timedelta(days=1)),
        Bounds(T0 + timedelta(days=1), hi=T0 + timedelta(days=2)),
    )
    store.put("appointments", appointment("a1", T0 + timedelta(hours=9)))
    seq = store.head_seq
    store.put("appointments", appointment("a1", T0 + timedelta(days=1, hours=9)))  # rescheduled
    assert ids(store.query("appointments", "datamodel", when=day1)) == []
    assert ids(store.query("appointments", "datamodel", when=day2)) == ["a1"]
    assert ids(store.query("appointments", "datamodel", when=day1, as_of_seq=seq)) == ["a1"]
    assert ids(store.query("appointments", "datamodel", when=day2, as_of_seq=seq)) == []


def test_query_filters_combine() -> None:
    store = Store(T0)
    for i in range(20):
        store.put("encounters", encounter(f"e{i:02d}", T0 + timedelta(hours=i), patient_id=f"p{i % 3}"))
    window = Bounds(T0 + timedelta(hours=5), hi=T0 + timedelta(hours=10), hi_inclusive=True)
    got = store.query("encounters", "fhir", when=window, patient_ids={"p0"})
    assert ids(got) == ["e06", "e09"]
    got = store.query("encounters", "fhir", source_ids=["e01", "e02", "zzz"], patient_ids=["p1"])
    assert ids(got) == ["e01"]
    assert store.query("encounters", "fhir", source_ids=[]) == []
    with pytest.raises(ValueError):
        store.query("patients", "fhir", when=window)


def test_query_by_last_updated() -> None:
    store = Store(T0)
    for i in range(6):
        store.clock = T0 + timedelta(hours=i)
        store.put("encounters", encounter(f"e{i}", T0))
    store.clock = T0 + timedelta(hours=10)
    store.put("encounters", encounter("e1", T0, status="cancelled"))
    since = Bounds(T0 + timedelta(hours=4))
    assert ids(store.query("encounters", "fhir", updated=since)) == ["e1", "e4", "e5"]
    strictly = Bounds(T0 + timedelta(hours=4), lo_inclusive=False)
    assert ids(store.query("encounters", "fhir", updated=strictly)) == ["e1", "e5"]


def test_query_patients_by_identifier_and_by_own_id() -> None:
    store = Store(T0)
    store.put("patients", patient("a", ("urn:sys:1", "42")))
    store.put("patients", patient("b", ("urn:sys:2", "42")))
    assert ids(store.query("patients", "fhir", identifier=("urn:sys:1", "42"))) == ["a"]
    assert ids(store.query("patients", "fhir", identifier=("urn:sys:1", "43"))) == []
    assert ids(store.query("patients", "fhir", patient_ids=["b", "c"])) == ["b"]
    # An identifier a patient no longer carries does not match its current version.
    store.put("patients", patient("a", ("urn:sys:1", "99")))
    assert ids(store.query("patients", "fhir", identifier=("urn:sys:1", "42"))) == []
    assert ids(store.query("patients", "fhir", identifier=("urn:sys:1", "42"), as_of_seq=2)) == ["a"]


def test_answers_are_copies() -> None:
    store = Store(T0)
    for i in range(3):
        store.put("encounters", encounter(f"e{i}", T0))
    first = store.query("encounters", "fhir")
    first.reverse()
    assert ids(store.query("encounters", "fhir")) == ["e0", "e1", "e2"]


def test_paging_a_snapshot_across_writes_neither_skips_nor_repeats() -> None:
    store = Store(T0)
    day = Bounds(T0, hi=T0 + timedelta(days=1))
    for i in range(0, 500, 2):
        store.put("encounters", encounter(f"e{i:04d}", T0 + timedelta(minutes=i)))
    snapshot = store.head_seq
    expected = ids(store.query("encounters", "fhir", when=day, as_of_seq=snapshot))
    seen: list[str] = []
    after: str | None = None
    page = 0
    while True:
        got = store.query("encounters", "fhir", when=day, as_of_seq=snapshot, after=after, limit=17)
        if not got:
            break
        seen += ids(got)
        after = got[-1].record.source_id
        # Between pages: new records sort in among the old ones, old ones change or leave the window.
        store.clock += timedelta(seconds=1)
        store.put("encounters", encounter(f"e{2 * page + 1:04d}", T0 + timedelta(minutes=5)))
        store.put("encounters", encounter(f"e{4 * page:04d}", T0 + timedelta(days=3)))
        page += 1
    assert seen == expected
    assert len(seen) == len(set(seen)) == 250
    assert ids(store.query("encounters", "fhir", when=day)) != expected


def test_refresh_after_bulk_load_and_incremental_writes() -> None:
    store = Store(T0)
    for i in range(100):
        store.put("encounters", encounter(f"e{99 - i:03d}", T0 + timedelta(minutes=99 - i)))
    store.refresh()
    window = Bounds(T0 + timedelta(minutes=10), hi=T0 + timedelta(minutes=20))
    assert ids(store.query("encounters", "fhir", when=window)) == [f"e{i:03d}" for i in range(10, 20)]
    store.put("encounters", encounter("e015b", T0 + timedelta(minutes=15)))
    assert "e015b" in ids(store.query("encounters", "fhir", when=window))


def test_put_new_writes_what_put_would() -> None:
    records = [encounter(f"e{i}", T0 + timedelta(hours=i % 3), patient_id=f"p{i % 2}") for i in range(6)]
    records.append(dataclasses.replace(encounter("e0", T0), surface="datamodel"))
    stamps = [T0 + timedelta(minutes=i) for i in range(len(records))]
    one, bulk = Store(T0 + timedelta(days=1)), Store(T0 + timedelta(days=1))
    one.put("patients", patient("x"))
    bulk.put("patients", patient("x"))
    for record, stamp in zip(records, stamps, strict=True):
        one.put("encounters", record, at=stamp)
    bulk.put_new("encounters", records, stamps)
    assert bulk.log() == one.log() and bulk.head_seq == one.head_seq == len(records) + 1
    window = Bounds(T0, True, T0 + timedelta(hours=1))
    for surface in ("fhir", "datamodel"):
        assert bulk.query("encounters", surface) == one.query("encounters", surface)
        assert bulk.query("encounters", surface, when=window) == one.query("encounters", surface, when=window)
        assert bulk.query("encounters", surface, patient_ids=["p1"]) == one.query(
            "encounters", surface, patient_ids=["p1"]
        )


def test_put_new_refuses_known_or_repeated_records_and_writes_nothing() -> None:
    store = Store(T0)
    store.put("encounters", encounter("e1", T0))
    with pytest.raises(ValueError, match="only new"):
        store.put_new("encounters", [encounter("e2", T0), encounter("e1", T0)], [T0, T0])
    with pytest.raises(ValueError, match="only new"):
        store.put_new("encounters", [encounter("e3", T0), encounter("e3", T0)], [T0, T0])
    with pytest.raises(ValueError, match="aware"):
        store.put_new("encounters", [encounter("e4", T0)], [datetime(2025, 1, 1)])
    with pytest.raises(ValueError, match="Encounter"):
        store.put_new("encounters", [patient("x")], [T0])  # type: ignore[list-item]
    assert store.head_seq == 1 and store.count("encounters", "fhir") == 1


def test_bulk_constructor_makes_ordinary_frozen_records() -> None:
    fields = [getattr(encounter("e1", T0), f.name) for f in dataclasses.fields(Encounter)]
    made = bulk_constructor(Encounter)(*fields)
    assert type(made) is Encounter and made == encounter("e1", T0) and hash(made) == hash(encounter("e1", T0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.status = "cancelled"  # type: ignore[misc]
    assert dataclasses.replace(made, status="cancelled").status == "cancelled"


def test_result_records_are_indexed_by_effective_time() -> None:
    store = Store(T0)
    result = Result(
        surface="datamodel",
        source_id="o1|718-7",
        patient_source_id="p1",
        order_id="o1",
        code="718-7",
        code_system="http://loinc.org",
        display="Hemoglobin",
        value_num=13.5,
        value_text=None,
        unit="g/dL",
        reference_low=12.0,
        reference_high=17.5,
        reference_text=None,
        abnormal_flag="normal",
        status="final",
        effective_at=T0 + timedelta(hours=2),
    )
    store.put("results", result)
    assert ids(store.query("results", "datamodel", when=Bounds(T0, hi=T0 + timedelta(hours=3)))) == [
        "o1|718-7"
    ]
    corrected = dataclasses.replace(result, status="corrected", value_num=11.0)
    store.put("results", corrected)
    assert store.query("results", "datamodel")[0].record.status == "corrected"  # type: ignore[union-attr]


def test_queries_are_fast_at_sandbox_scale() -> None:
    """~120k records; one-day windows and patient lookups must not scan (HTTP serves 500 pages/s)."""
    store = Store(T0)
    for i in range(120_000):
        start = T0 - timedelta(minutes=i)  # ~83 days
        store.put("encounters", encounter(f"e{i:06d}", start, patient_id=f"p{i % 10_000:05d}"))
    store.refresh()
    began = time.process_time()
    for d in range(40):
        lo = T0 - timedelta(days=d + 1)
        got = store.query("encounters", "fhir", when=Bounds(lo, hi=lo + timedelta(days=1)), limit=100)
        assert len(got) == 100
        patients = [f"p{(d * 100 + k) % 10_000:05d}" for k in range(100)]
        assert len(store.query("encounters", "fhir", patient_ids=patients)) == 1200
    cold = time.process_time() - began
    began = time.process_time()
    window = Bounds(T0 - timedelta(days=1), hi=T0)
    after = None
    for _ in range(14):  # page through a cached day, as a FHIR cursor does
        page = store.query(
            "encounters", "fhir", when=window, as_of_seq=store.head_seq, after=after, limit=100
        )
        after = page[-1].record.source_id
    warm = time.process_time() - began
    assert cold < 2.0, cold  # 80 uncached queries
    assert warm < 0.05, warm
