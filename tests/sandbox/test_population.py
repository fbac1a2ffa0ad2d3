"""The sandbox population: the ground truth every other test is judged against.

It must be deterministic, shaped as designed (overlap, identifiers, noise, hard non-matches), typed
exactly like the unified warehouse schema, and it must keep changing plausibly as the clock moves.
"""

import dataclasses
import itertools
import re
import time
import zlib
from collections import Counter
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from sandbox import names
from sandbox.model import Appointment, Encounter, Patient, Result
from sandbox.population import (
    CHANGE_KINDS,
    DM_EHRID,
    DM_MRN,
    ENTERPRISE,
    FHIR_MRN,
    HARD_GROUPS,
    NOISE_KINDS,
    PopulationConfig,
    World,
    build,
    generate_patient_frame,
)
from sandbox.store import Bounds
from schema import PATIENTS, UNIFIED_TABLES, VALUESETS

CONFIG = PopulationConfig(seed=7, patients=1000, start=date(2025, 3, 1), end=date(2025, 5, 31))
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def world() -> World:
    return build(CONFIG)


@pytest.fixture(scope="module")
def truth(world: World) -> dict[str, pl.DataFrame]:
    return world.truth()


def patients_by_person(world: World) -> dict[str, dict[str, Patient]]:
    out: dict[str, dict[str, Patient]] = {}
    for pid, copies in world.patients_of.items():
        for surface, sid in copies:
            record = world.store.current("patients", surface, sid).record  # type: ignore[union-attr]
            assert isinstance(record, Patient)
            out.setdefault(pid, {})[surface] = record
    return out


# -- determinism ----------------------------------------------------------------------------------


def test_same_config_same_world(truth: dict[str, pl.DataFrame]) -> None:
    again = build(CONFIG).truth()
    assert truth.keys() == again.keys()
    for name, frame in truth.items():
        assert frame.equals(again[name]), name


def test_other_seed_other_world(truth: dict[str, pl.DataFrame]) -> None:
    other = build(dataclasses.replace(CONFIG, seed=8, patients=200)).truth()
    assert set(other["patients"]["source_id"]).isdisjoint(set(truth["patients"]["source_id"]))
    names_here = truth["patients"].select("given_name", "family_name").head(50)
    assert not other["patients"].select("given_name", "family_name").head(50).equals(names_here)


def test_advancing_is_deterministic() -> None:
    small = PopulationConfig(seed=3, patients=150, start=date(2025, 1, 1), end=date(2025, 1, 31))
    a, b = build(small), build(small)
    for step in (timedelta(hours=5), timedelta(days=2), timedelta(minutes=1)):
        assert a.advance(step) == b.advance(step)
    ta, tb = a.truth(), b.truth()
    for name, frame in ta.items():
        assert frame.equals(tb[name]), name
    assert a.store.head_seq == b.store.head_seq


def test_default_dates_resolve_to_today() -> None:
    resolved = PopulationConfig().resolved()
    assert resolved.end == datetime.now(UTC).date() or resolved.end == datetime.now(UTC).date() - timedelta(
        days=1
    )
    assert resolved.start == resolved.end - timedelta(days=90)
    with pytest.raises(ValueError):
        PopulationConfig(start=date(2025, 2, 1), end=date(2025, 1, 1)).resolved()


# -- population shape -----------------------------------------------------------------------------


def test_persons_overlap_across_surfaces(world: World, truth: dict[str, pl.DataFrame]) -> None:
    surfaces = truth["persons"].group_by("person_id").agg(pl.col("surface").sort().str.join(","))
    share = Counter(surfaces["surface"].to_list())
    n = len(world.persons)
    assert n == CONFIG.patients
    assert share["datamodel,fhir"] / n == pytest.approx(0.6, abs=0.05)
    assert share["fhir"] / n == pytest.approx(0.2, abs=0.04)
    assert share["datamodel"] / n == pytest.approx(0.2, abs=0.04)
    # One patient per person per surface, and every patient belongs to exactly one person.
    assert truth["persons"].select("person_id", "surface").is_unique().all()
    assert truth["persons"].height == truth["patients"].height
    joined = truth["persons"].join(
        truth["patients"],
        left_on=["surface", "source_patient_id"],
        right_on=["source_surface", "source_id"],
        how="anti",
    )
    assert joined.height == 0


def test_identifier_shapes(truth: dict[str, pl.DataFrame]) -> None:
    patients = truth["patients"]
    idents = (
        patients.select("source_surface", "source_id", "identifiers")
        .explode("identifiers")
        .unnest("identifiers")
    )
    assert idents["system"].str.starts_with("urn:").all()
    fhir = patients.filter(pl.col("source_surface") == "fhir")
    assert fhir["source_id"].str.contains(UUID.pattern).all()
    by_surface = idents.group_by("source_surface").agg(pl.col("system").unique().sort())
    systems = dict(by_surface.iter_rows())
    assert systems["fhir"] == sorted([FHIR_MRN, ENTERPRISE])
    assert systems["datamodel"] == sorted([DM_MRN, DM_EHRID, ENTERPRISE])
    # A Data Model patient's id is its MRN; every patient has exactly one MRN (and DM one EHRID).
    dm_mrn = idents.filter(pl.col("system") == DM_MRN)
    assert (dm_mrn["source_id"] == dm_mrn["value"]).all()
    per_patient = idents.group_by("source_surface", "source_id", "system").len()
    assert (per_patient["len"] == 1).all()
    assert idents.filter(pl.col("system") == DM_EHRID)["value"].str.contains(UUID.pattern).all()
    # SSNs are in Patient.ssn only, in the never-issued 9xx area.
    assert not idents["value"].str.contains(r"^\d{3}-\d{2}-\d{4}$").any()
    ssn = patients["ssn"].drop_nulls()
    assert ssn.str.contains(r"^9\d{2}-\d{2}-\d{4}$").all()


def test_identifiers_never_shared_across_persons_within_a_system(truth: dict[str, pl.DataFrame]) -> None:
    idents = (
        truth["patients"]
        .select("source_surface", "source_id", "identifiers")
        .explode("identifiers")
        .unnest("identifiers")
        .join(
            truth["persons"],
            left_on=["source_surface", "source_id"],
            right_on=["surface", "source_patient_id"],
        )
    )
    per_value = idents.group_by("system", "value").agg(pl.col("person_id").n_unique())
    assert (per_value["person_id"] == 1).all()
    # The enterprise id, where present, is the same on both copies of a person and on no one else.
    enterprise = idents.filter(pl.col("system") == ENTERPRISE)
    assert (
        enterprise.group_by("value").agg(pl.col("source_surface").n_unique())["source_surface"] == 2
    ).all()
    # Decoys: the same value in different systems, belonging to different persons.
    across = idents.group_by("value").agg(
        pl.col("person_id").n_unique().alias("persons"), pl.col("system").n_unique()
    )
    assert across.filter((pl.col("persons") > 1) & (pl.col("system") > 1)).height >= 1


def test_enterprise_link_for_about_half_of_shared_persons(world: World) -> None:
    copies = patients_by_person(world)
    shared = [c for c in copies.values() if len(c) == 2]
    linked = [c for c in shared if any(i.system == ENTERPRISE for i in c["fhir"].identifiers)]
    assert len(linked) / len(shared) == pytest.approx(0.5, abs=0.07)
    single = [c for c in copies.values() if len(c) == 1]
    assert not any(i.system == ENTERPRISE for c in single for p in c.values() for i in p.identifiers)


def test_contact_details_look_synthetic_and_well_formed(truth: dict[str, pl.DataFrame]) -> None:
    patients = truth["patients"]
    assert patients["phone"].drop_nulls().str.contains(r"^\+1[2-9]\d{9}$").all()
    domains = patients["email"].drop_nulls().str.extract(r"@(.+)$")
    assert set(domains.unique()) <= set(names.EMAIL_DOMAINS)
    assert patients["address_postal_code"].str.contains(r"^\d{5}$").all()
    assert patients["address_line"].str.contains(r"^\d+ \S").all()
    assert set(patients["sex"].unique()) <= set(VALUESETS["sex"])
    assert patients["given_name"].null_count() == 0 and patients["family_name"].null_count() == 0


# -- noise ----------------------------------------------------------------------------------------


def test_every_noise_kind_is_present(truth: dict[str, pl.DataFrame]) -> None:
    applied = Counter(truth["noise"]["noise"].explode().drop_nulls().to_list())
    assert set(applied) == set(NOISE_KINDS), set(NOISE_KINDS) - set(applied)


def test_noise_is_recorded_and_true_to_its_kind(world: World) -> None:
    checked: Counter[str] = Counter()
    for pid, copies in patients_by_person(world).items():
        person = world.persons[pid]
        kinds = [k for p in copies.values() for k in p.noise]
        if len(copies) < 2:
            assert not kinds  # nothing to compare against, so no noise
            continue
        linked = any(i.system == ENTERPRISE for i in copies["fhir"].identifiers)
        assert len(kinds) <= (1 if linked else 3)
        for p in copies.values():
            if not p.noise:
                assert (p.given_name, p.family_name, p.birth_date, p.ssn) == (
                    person.given_name,
                    person.family_name,
                    person.birth_date,
                    person.ssn,
                )
            if "nickname" in p.noise and not {"typo", "name-swap"} & set(p.noise):
                assert p.given_name in names.NICKNAMES[person.given_name]
                checked["nickname"] += 1
            if "dob-swap" in p.noise:
                assert p.birth_date == date(
                    person.birth_date.year, person.birth_date.day, person.birth_date.month
                )
                checked["dob-swap"] += 1
            if "missing-ssn" in p.noise:
                assert p.ssn is None and person.ssn is not None
                checked["missing-ssn"] += 1
            if "ssn-digit" in p.noise:
                assert p.ssn is not None and person.ssn is not None
                assert sum(a != b for a, b in zip(p.ssn, person.ssn, strict=True)) == 1
                checked["ssn-digit"] += 1
            if "moved" in p.noise:
                assert p.address_line != person.address_line
                checked["moved"] += 1
            if "name-swap" in p.noise and not {"typo", "nickname", "married-name", "hyphenated"} & set(
                p.noise
            ):
                assert (p.given_name, p.family_name) == (person.family_name, person.given_name)
                checked["name-swap"] += 1
            if "missing-phone" in p.noise:
                assert p.phone is None and person.phone is not None
            if "missing-email" in p.noise:
                assert p.email is None and person.email is not None
            if "typo" in p.noise and len(p.noise) == 1:
                changed = [
                    (a, b)
                    for a, b in ((p.given_name, person.given_name), (p.family_name, person.family_name))
                    if a != b
                ]
                assert len(changed) == 1
                a, b = changed[0]
                assert a is not None and abs(len(a) - len(b)) <= 1
                checked["typo"] += 1
    assert min(checked.values()) >= 1 and len(checked) >= 6


def test_most_noisy_pairs_have_at_most_two_kinds(world: World) -> None:
    per_pair = [
        sum(len(p.noise) for p in copies.values())
        for copies in patients_by_person(world).values()
        if len(copies) == 2
    ]
    spread = Counter(min(n, 3) for n in per_pair)
    assert spread[3] / len(per_pair) < 0.08
    assert spread[0] > spread[3] and spread[1] > spread[3]


# -- hard non-matches -----------------------------------------------------------------------------


def test_hard_groups(world: World, truth: dict[str, pl.DataFrame]) -> None:
    groups = truth["hard_groups"]
    assert set(groups["hard_group"].unique()) == set(HARD_GROUPS)
    assert groups["person_id"].is_unique().all()
    share = groups.height / len(world.persons)
    assert 0.015 <= share <= 0.035
    for members in world.groups.values():
        people = [world.persons[m] for m in members]
        assert len(people) >= 2 and len({p.person_id for p in people}) == len(people)
        kind = people[0].hard_group
        assert all(p.hard_group == kind for p in people)
        first = people[0]
        for other in people[1:]:
            assert other.family_name == first.family_name
            if kind == "twin":
                assert other.birth_date == first.birth_date
                assert other.address_line == first.address_line and other.phone == first.phone
                assert other.given_name != first.given_name
            elif kind == "same-name-dob":
                assert (other.given_name, other.birth_date) == (first.given_name, first.birth_date)
                assert other.ssn != first.ssn or other.ssn is None
            else:
                assert other.address_line == first.address_line
                assert other.birth_date != first.birth_date


# -- clinical records -----------------------------------------------------------------------------


def test_truth_columns_and_dtypes_match_the_unified_schema(truth: dict[str, pl.DataFrame]) -> None:
    for kind, schema in UNIFIED_TABLES.items():
        expected = [
            (name, dtype)
            for name, dtype in schema.items()
            if not name.endswith("_source") and name != "source_updated_at"
        ]
        expected += [("last_updated", pl.Datetime("us", "UTC")), ("version_id", pl.Int64())]
        assert list(truth[kind].schema.items()) == expected, kind


def test_clinical_values_use_the_canonical_vocabularies(truth: dict[str, pl.DataFrame]) -> None:
    assert set(truth["encounters"]["class"].unique()) == set(VALUESETS["encounter_class"]) - {"unknown"}
    assert set(truth["encounters"]["status"].unique()) <= set(VALUESETS["encounter_status"])
    assert set(truth["results"]["status"].unique()) <= set(VALUESETS["result_status"])
    # Blood pressure readings carry no flag (null), as their sources send none.
    assert set(truth["results"]["abnormal_flag"].drop_nulls().unique()) <= set(VALUESETS["abnormal_flag"])
    assert {"normal", "low", "high", "abnormal"} <= set(truth["results"]["abnormal_flag"].unique())
    assert set(truth["appointments"]["status"].unique()) >= {"booked", "fulfilled", "cancelled", "noshow"}
    assert set(truth["appointments"]["status"].unique()) <= set(VALUESETS["appointment_status"])
    assert set(truth["appointments"]["duration_min"].unique()) <= {15, 20, 30, 45, 60}


def test_records_point_at_patients_of_their_surface(truth: dict[str, pl.DataFrame]) -> None:
    patients = truth["patients"].select("source_surface", patient_source_id="source_id")
    for kind in ("encounters", "results", "appointments"):
        orphans = truth[kind].join(patients, on=["source_surface", "patient_source_id"], how="anti")
        assert orphans.height == 0, kind
        assert truth[kind].select("source_surface", "source_id").is_unique().all(), kind


def test_ids_have_each_surface_shape(truth: dict[str, pl.DataFrame]) -> None:
    for kind in ("encounters", "results", "appointments"):
        frame = truth[kind]
        if kind == "results":
            # Blood pressure panels ('bp-<order>') and their components ('<panel>/component/<i>').
            frame = frame.filter(~pl.col("source_id").str.starts_with("bp-"))
        assert frame.filter(pl.col("source_surface") == "fhir")["source_id"].str.contains(UUID.pattern).all()
    panels = truth["results"].filter(pl.col("source_id").str.starts_with("bp-"))
    assert panels["source_id"].str.contains(r"^bp-\d+(?:/component/[01])?$").all()
    assert (panels["parent_source_id"].is_null() == ~panels["source_id"].str.contains("/component/")).all()
    dm = pl.col("source_surface") == "datamodel"
    visits = pl.concat(
        [truth["encounters"].filter(dm)["source_id"], truth["appointments"].filter(dm)["source_id"]]
    )
    # A store key is unique; a few are '<sent id>~<own id>': an id reused for another patient.
    assert visits.str.contains(r"^\d{9}(?:~\d{9})?$").all() and visits.is_unique().all()
    results = truth["results"].filter(dm)
    assert (results["source_id"] == results["order_id"] + "|" + results["code"]).all()
    assert truth["results"].select("source_surface", "order_id", "code").is_unique().all()
    for kind, key in (("encounters", "source_id"), ("appointments", "source_id"), ("results", "order_id")):
        rows = truth[kind].filter(dm).select(key, "patient_source_id").unique()
        reused = rows.filter(pl.col(key).str.contains("~"))
        assert reused.height > 0, kind
        owners = dict(rows.filter(~pl.col(key).str.contains("~")).iter_rows())
        for stored, patient in reused.iter_rows():
            sent = stored.split("~")[0]
            # Sent with the id of another patient's record, which is sent as it is.
            assert sent in owners and owners[sent] != patient, (kind, stored)
        # Redox keys a record by patient and id: no patient is sent one id for two records.
        sent_rows = rows.with_columns(pl.col(key).str.replace(r"~.*", ""))
        assert sent_rows.is_unique().all(), kind


def test_a_patient_is_never_sent_one_reused_id_twice() -> None:
    # Seed 11's hospital world once gave one patient two same-moment orders that both took the id of
    # the same other patient's order: two orders under one (patient, id), which Redox cannot send.
    from sandbox.population.records import REUSE_EVERY, reused_ids

    hits = [
        i
        for i in (f"{n:09d}" for n in range(100_000_000, 100_010_000))
        if zlib.crc32(i.encode()) % REUSE_EVERY == 0
    ]
    frame = pl.DataFrame(
        {
            "surface": ["datamodel"] * 4,
            "order_id": ["111111111", hits[0], hits[1], hits[2]],
            "patient_source_id": ["p1", "p2", "p2", "p2"],
        }
    )
    reused = reused_ids(frame, "order_id")
    assert reused[hits[0]] == f"111111111~{hits[0]}"
    # p1 has no other id left for p2, so the second and third are sent as they are.
    assert hits[1] not in reused and hits[2] not in reused


def test_times_are_utc_whole_seconds_inside_the_range(world: World, truth: dict[str, pl.DataFrame]) -> None:
    lo, now = world.start_at, world.clock0
    horizon = now + timedelta(days=31)
    for kind, column, upper in (
        ("encounters", "start_at", now),
        ("results", "effective_at", now),
        ("appointments", "start_at", horizon),
    ):
        times = truth[kind][column]
        assert times.min() >= lo and times.max() < upper, kind  # type: ignore[operator]
        assert (times.dt.microsecond() == 0).all()
        assert (truth[kind]["last_updated"] <= now).all()
    enc = truth["encounters"]
    assert (
        enc.filter(pl.col("end_at").is_not_null()).select(pl.col("end_at") > pl.col("start_at")).to_series()
    ).all()
    assert (
        enc.filter(pl.col("status") == "in-progress")["end_at"].null_count()
        == enc.filter(pl.col("status") == "in-progress").height
    )
    appts = truth["appointments"]
    assert ((appts["end_at"] - appts["start_at"]).dt.total_minutes() == appts["duration_min"]).all()
    future = appts.filter(pl.col("start_at") > now)
    assert set(future["status"].unique()) <= {"booked", "cancelled"}
    assert (future["status"] == "booked").mean() > 0.85  # type: ignore[operator]


def test_clinic_hours_in_the_ehr_zone(truth: dict[str, pl.DataFrame]) -> None:
    local = truth["appointments"]["start_at"].dt.convert_time_zone(CONFIG.fhir_tz)
    hours = local.dt.hour()
    assert ((hours >= 8) & (hours < 17)).mean() > 0.97  # type: ignore[operator]
    assert (local.dt.minute() % 15 == 0).mean() > 0.97  # type: ignore[operator]


def test_rates_per_patient(truth: dict[str, pl.DataFrame]) -> None:
    n = truth["patients"].height
    days = (CONFIG.end - CONFIG.start).days + 1  # type: ignore[operator]
    assert truth["encounters"].height / n * 90 / days == pytest.approx(3, rel=0.15)
    assert truth["results"].height / n * 90 / days == pytest.approx(8, rel=0.25)
    assert truth["appointments"].height / n * 90 / (days + 30) == pytest.approx(3, rel=0.15)


def test_abnormal_flags_follow_values_and_ranges(truth: dict[str, pl.DataFrame]) -> None:
    blood_pressure = pl.col("code").is_in(["85354-9", "8480-6", "8462-4"])
    numeric = truth["results"].filter(pl.col("value_num").is_not_null() & ~blood_pressure)
    for row in numeric.iter_rows(named=True):
        v, lo, hi, flag = row["value_num"], row["reference_low"], row["reference_high"], row["abnormal_flag"]
        assert hi is not None and row["unit"] is not None
        if flag == "normal":
            assert (lo is None or v >= lo) and v <= hi
        elif flag in ("high", "critical_high"):
            assert v > hi
        else:
            assert lo is not None and v < lo
    text = truth["results"].filter(pl.col("value_text").is_not_null())
    # FHIR sends the nitrite dipstick as a boolean; every other qualitative value is Positive/Negative.
    assert set(text["value_text"].unique()) == {"Positive", "Negative", "true", "false"}
    positive = text["value_text"].is_in(["Positive", "true"])
    assert (positive == (text["abnormal_flag"] == "abnormal")).all()
    coded = truth["results"].filter(pl.col("value_type") == "codeable_concept")
    assert not coded.is_empty() and (coded["source_surface"] == "fhir").all()
    assert (
        coded["value_code"] == coded["value_text"].replace({"Positive": "10828004", "Negative": "260385009"})
    ).all()
    assert (text["reference_text"] == "Negative").all()
    panels = truth["results"].group_by("source_surface", "order_id").agg(pl.col("effective_at").n_unique())
    assert (panels["effective_at"] == 1).all()


# -- advance --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def advanced() -> tuple[World, int, datetime, dict[str, int]]:
    world = build(PopulationConfig(seed=11, patients=1000, start=date(2025, 3, 1), end=date(2025, 5, 31)))
    head, clock = world.store.head_seq, world.clock
    counts: Counter[str] = Counter()
    for _ in range(7):
        counts.update(world.advance(timedelta(days=1)))
    return world, head, clock, dict(counts)


def test_advance_produces_every_change_kind(advanced: tuple[World, int, datetime, dict[str, int]]) -> None:
    world, _, clock, counts = advanced
    assert set(counts) == set(CHANGE_KINDS)
    assert all(counts[k] > 0 for k in CHANGE_KINDS), {k: v for k, v in counts.items() if not v}
    assert world.clock == clock + timedelta(days=7)
    assert len(world.persons) == 1000 + counts["new_persons"]


def test_advance_versions_are_later_and_numbered_in_order(
    advanced: tuple[World, int, datetime, dict[str, int]],
) -> None:
    world, head, clock, counts = advanced
    changed = world.store.log(after_seq=head)
    assert len(changed) == world.store.head_seq - head
    assert len(changed) >= sum(counts.values()) - counts["new_persons"]
    assert all(clock < v.last_updated <= world.clock for v in changed)
    # Changes are written in time order, as they happened.
    stamps = [v.last_updated for v in changed]
    assert stamps == sorted(stamps)
    for v in changed:
        history = world.store.history(v.kind, v.record.surface, v.record.source_id)
        assert [h.version_id for h in history] == list(range(1, len(history) + 1))
        assert all(a.last_updated < b.last_updated and a.seq < b.seq for a, b in itertools.pairwise(history))


def test_advance_changes_are_what_they_say(advanced: tuple[World, int, datetime, dict[str, int]]) -> None:
    world, head, _, _ = advanced
    seen: Counter[str] = Counter()
    for v in world.store.log(after_seq=head):
        if v.version_id == 1:
            if isinstance(v.record, Appointment):
                assert v.record.status == "booked" and v.record.start_at > v.last_updated
            continue
        before = world.store.history(v.kind, v.record.surface, v.record.source_id)[v.version_id - 2].record
        r = v.record
        if isinstance(r, Appointment):
            assert isinstance(before, Appointment)
            if r.start_at != before.start_at:
                seen["rescheduled"] += 1
                assert r.status == "booked" and r.duration_min == before.duration_min
            elif r.status != "entered-in-error":
                assert before.status == "booked" and r.status in ("cancelled", "fulfilled", "noshow")
                seen[r.status] += 1
        elif isinstance(r, Result):
            assert isinstance(before, Result)
            assert (before.status, r.status) in {("final", "corrected"), ("preliminary", "final")} or (
                r.status == "entered-in-error"
            )
            if r.status == "corrected":
                seen["corrected"] += 1
                assert r.order_id == before.order_id and r.code == before.code
        elif isinstance(r, Encounter):
            assert isinstance(before, Encounter)
            if r.status == "finished":
                assert before.status == "in-progress" and r.end_at is not None
                seen["finished"] += 1
        elif isinstance(r, Patient):
            assert "moved" in r.noise
    assert {"rescheduled", "cancelled", "fulfilled", "corrected", "finished"} <= set(seen)


def test_new_patients_appear_in_truth_with_their_visits(
    advanced: tuple[World, int, datetime, dict[str, int]],
) -> None:
    world, head, clock, _ = advanced
    truth = world.truth()
    new = [v.record for v in world.store.log(after_seq=head) if v.kind == "patients" and v.version_id == 1]
    assert new
    new_ids = {(p.surface, p.source_id) for p in new}
    persons = truth["persons"]
    assert all(
        persons.filter((pl.col("surface") == s) & (pl.col("source_patient_id") == sid)).height == 1
        for s, sid in new_ids
    )
    visited = {
        (v.record.surface, v.record.patient_source_id)
        for v in world.store.log(after_seq=head)
        if isinstance(v.record, Encounter)
    }
    assert len(new_ids & visited) >= len(new_ids) // 2
    window = Bounds(clock, hi=world.clock, hi_inclusive=True)
    assert world.store.query("encounters", "fhir", when=window)


def test_advance_edges() -> None:
    world = build(PopulationConfig(seed=5, patients=50, start=date(2025, 1, 1), end=date(2025, 1, 10)))
    head = world.store.head_seq
    assert world.advance(timedelta(0)) == dict.fromkeys(CHANGE_KINDS, 0)
    assert world.store.head_seq == head
    with pytest.raises(ValueError):
        world.advance(timedelta(seconds=-1))
    world.advance(timedelta(milliseconds=500))
    assert world.clock == world.clock0 + timedelta(milliseconds=500)


# -- the identity benchmark's frame ---------------------------------------------------------------


def test_generate_patient_frame_shape_and_types() -> None:
    began = time.process_time()
    frame = generate_patient_frame(10_000, seed=3)
    elapsed = time.process_time() - began
    assert elapsed < 10, elapsed
    assert frame.height == 10_000
    assert list(frame.schema.items()) == [*PATIENTS.items(), ("person_id", pl.String())]
    assert frame.select("source_surface", "source_id").is_unique().all()
    per_person = frame.group_by("person_id").agg(pl.col("source_surface").n_unique(), pl.len())
    assert (per_person["source_surface"] == per_person["len"]).all()
    assert (per_person["len"] == 2).mean() == pytest.approx(0.6, abs=0.03)
    assert set(frame["sex_source"].unique()) <= {
        "male",
        "female",
        "other",
        "unknown",
        "Male",
        "Female",
        "Other",
        "Unknown",
    }
    assert frame.equals(generate_patient_frame(10_000, seed=3))
    assert not frame.equals(generate_patient_frame(10_000, seed=4))
    assert generate_patient_frame(0, seed=3).schema == frame.schema


def test_generate_patient_frame_has_the_world_noise_and_hard_groups() -> None:
    frame = generate_patient_frame(20_000, seed=1)
    persons = (
        frame.group_by("person_id")
        .agg(
            pl.col("given_name").n_unique().alias("given"),
            pl.col("birth_date").n_unique().alias("dob"),
            pl.col("ssn").n_unique().alias("ssn"),
            pl.len(),
        )
        .filter(pl.col("len") == 2)
    )
    differs = persons.filter((pl.col("given") > 1) | (pl.col("dob") > 1) | (pl.col("ssn") > 1)).height
    assert 0.1 < differs / persons.height < 0.5
    # Strangers that share name and birth date exist, so name+DOB alone cannot be a key.
    same = frame.group_by("given_name", "family_name", "birth_date").agg(pl.col("person_id").n_unique())
    assert (same["person_id"] > 1).sum() >= 5
