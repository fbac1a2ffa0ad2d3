"""FHIR pages -> unified tables: field mapping, UTC, ValueSets, quarantine, dedupe, counts."""

import copy
import json
from datetime import UTC, date, datetime
from typing import Any

import polars as pl
import pytest

import schema
from transforms import common, fhir, references, valuesets

TABLE = {
    "patients": "patients",
    "encounters": "encounters",
    "results": "results",
    "appointments": "appointments",
}


def bundle(*resources: Any, raw_entries: list[Any] | None = None) -> str:
    entries: list[Any] = [{"fullUrl": f"urn:x:{i}", "resource": r} for i, r in enumerate(resources)]
    return json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": entries + (raw_entries or [])})


def pages(*bodies: str) -> pl.LazyFrame:
    return pl.LazyFrame(
        {
            "raw_ref": [f"fhir/x/day=2026-11-01/page-{i:05d}" for i in range(len(bodies))],
            "body": list(bodies),
        },
        schema={"raw_ref": pl.String(), "body": pl.String()},
    )


def run(entity: str, *bodies: str) -> pl.DataFrame:
    out = getattr(fhir, entity)(pages(*bodies)).collect()
    assert out.schema == common.normalized_schema(TABLE[entity])
    counted = fhir.count_entries(pages(*bodies), entity).collect().row(0, named=True)
    tally = common.tally(out)
    assert counted["records"] == tally["good"] + tally["duplicates"] + tally["quarantined"]
    return out


def good(out: pl.DataFrame) -> pl.DataFrame:
    return out.filter(pl.col("quarantine_reason").is_null())


def bad(out: pl.DataFrame) -> pl.DataFrame:
    return out.filter(pl.col("quarantine_reason").is_not_null())


PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "pat-1",
    "meta": {"versionId": "2", "lastUpdated": "2026-11-01T09:30:00-04:00"},
    "identifier": [
        {"system": "urn:redox:health-one:MR", "value": "0000000001"},
        {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "101-01-0001"},
        {"system": "urn:oid:1.2.840.114350.1.13.12345.1.7.2.798268", "value": "E1"},
    ],
    "name": [
        {"use": "old", "family": "Oldname", "given": ["Tim"]},
        {"use": "official", "family": "Bixby", "given": ["Timothy", "Paul"]},
    ],
    "gender": "male",
    "birthDate": "2008-01-06",
    "address": [
        {"use": "work", "line": ["1 Work Rd"], "city": "Madison"},
        {
            "use": "home",
            "line": ["4762 Hickory Street", "Apt 2"],
            "city": "Monroe",
            "state": "WI",
            "postalCode": "53566",
        },
    ],
    "telecom": [
        {"system": "email", "value": "tim@example.org"},
        {"system": "phone", "value": "+18088675302", "use": "mobile"},
        {"system": "phone", "value": "+18088675301", "use": "home"},
    ],
}

ENCOUNTER: dict[str, Any] = {
    "resourceType": "Encounter",
    "id": "enc-1",
    "meta": {"lastUpdated": "2026-11-01T10:00:00.250-04:00"},
    "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003", "display": "Check up"}]}],
    "subject": {"reference": "Patient/pat-1"},
    "participant": [
        {"type": [{"coding": [{"code": "CON"}]}], "individual": {"reference": "Practitioner/other"}},
        {
            "type": [{"coding": [{"code": "ATND"}]}],
            "individual": {
                "identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "4356789876"},
                "display": "Pat Granite",
            },
        },
    ],
    "period": {"start": "2026-11-01T09:30:00-04:00", "end": "2026-11-01T10:15:00-04:00"},
    "reasonCode": [{"text": "Check up"}],
    "location": [{"location": {"display": "Clinic A"}}],
}

OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "obs-1",
    "meta": {"lastUpdated": "2026-11-02T08:00:00+01:00"},
    "basedOn": [{"reference": "ServiceRequest/ord-9"}],
    "status": "final",
    "code": {
        "coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}],
        "text": "Glucose",
    },
    "subject": {"reference": "https://fhir.example.org/R4/Patient/pat-1/_history/3"},
    "effectiveDateTime": "2026-11-01T23:30:00-05:00",
    "valueQuantity": {
        "value": 105.5,
        "unit": "mg/dL",
        "system": "http://unitsofmeasure.org",
        "code": "mg/dL",
    },
    "interpretation": [{"coding": [{"code": "H"}]}],
    "referenceRange": [{"low": {"value": 70}, "high": {"value": 99}}],
}

APPOINTMENT: dict[str, Any] = {
    "resourceType": "Appointment",
    "id": "apt-1",
    "meta": {"lastUpdated": "2026-11-01T12:00:00Z"},
    "status": "booked",
    "appointmentType": {"coding": [{"code": "FOLLOWUP", "display": "A follow up visit"}]},
    "reasonCode": [{"text": "Follow up"}],
    "start": "2026-11-03T08:00:00-05:00",
    "end": "2026-11-03T08:20:00-05:00",
    "participant": [
        {"actor": {"reference": "Patient/pat-1"}, "status": "accepted"},
        {
            "type": [{"coding": [{"code": "ATND"}]}],
            "actor": {
                "identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "111"},
                "display": "Sharon Chalk",
            },
        },
        {"actor": {"display": "Clinic B"}},
    ],
}


def with_(resource: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


# --- field mapping -------------------------------------------------------------------------------


def test_patient_fields() -> None:
    row = good(run("patients", bundle(PATIENT))).row(0, named=True)
    assert row["source_surface"] == "fhir"
    assert row["source_id"] == "pat-1"
    assert row["identifiers"] == [
        {"system": "urn:redox:health-one:MR", "value": "0000000001"},
        {"system": "urn:oid:1.2.840.114350.1.13.12345.1.7.2.798268", "value": "E1"},
    ]
    assert row["ssn"] == "101-01-0001"
    assert (row["given_name"], row["middle_name"], row["family_name"]) == ("Timothy", "Paul", "Bixby")
    assert row["birth_date"] == date(2008, 1, 6)
    assert (row["sex"], row["sex_source"]) == ("male", "male")
    assert row["address_line"] == "4762 Hickory Street, Apt 2"
    assert (row["address_city"], row["address_state"], row["address_postal_code"]) == (
        "Monroe",
        "WI",
        "53566",
    )
    assert row["phone"] == "+18088675301"
    assert row["email"] == "tim@example.org"
    assert row["source_updated_at"] == datetime(2026, 11, 1, 13, 30, tzinfo=UTC)
    assert row["raw"] is None and row["duplicates"] == 0


def test_encounter_fields_and_local_offsets_to_utc() -> None:
    row = good(run("encounters", bundle(ENCOUNTER))).row(0, named=True)
    assert row["patient_source_id"] == "pat-1"
    assert (row["class"], row["class_source"]) == ("ambulatory", "AMB")
    assert (row["type_code"], row["type_system"], row["type_display"]) == (
        "185349003",
        "http://snomed.info/sct",
        "Check up",
    )
    assert (row["status"], row["status_source"]) == ("finished", "finished")
    assert row["start_at"] == datetime(2026, 11, 1, 13, 30, tzinfo=UTC)
    assert row["end_at"] == datetime(2026, 11, 1, 14, 15, tzinfo=UTC)
    assert row["source_updated_at"] == datetime(2026, 11, 1, 14, 0, 0, 250000, tzinfo=UTC)
    assert row["location"] == "Clinic A"
    assert (row["attending_provider_id"], row["attending_provider_name"]) == ("4356789876", "Pat Granite")
    assert row["reason"] == "Check up"


def test_observation_fields() -> None:
    row = good(run("results", bundle(OBSERVATION))).row(0, named=True)
    assert row["patient_source_id"] == "pat-1"  # absolute URL with _history
    assert row["order_id"] == "ord-9"
    assert (row["code"], row["code_system"], row["display"]) == ("2345-7", "http://loinc.org", "Glucose")
    assert (row["value_num"], row["value_text"], row["unit"]) == (105.5, None, "mg/dL")
    assert (row["reference_low"], row["reference_high"], row["reference_text"]) == (70.0, 99.0, None)
    assert (row["abnormal_flag"], row["abnormal_flag_source"]) == ("high", "H")
    assert (row["status"], row["status_source"]) == ("final", "final")
    assert row["effective_at"] == datetime(2026, 11, 2, 4, 30, tzinfo=UTC)
    assert row["source_updated_at"] == datetime(2026, 11, 2, 7, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"valueQuantity": None, "valueString": "Positive"}, (None, "Positive", 70.0, 99.0, None)),
        (
            {"valueQuantity": None, "valueCodeableConcept": {"coding": [{"display": "Green"}]}},
            (None, "Green", 70.0, 99.0, None),
        ),
        ({"referenceRange": [{"text": "3.5-5.0"}]}, (105.5, None, 3.5, 5.0, None)),
        ({"referenceRange": [{"text": "<5"}]}, (105.5, None, None, 5.0, None)),
        ({"referenceRange": [{"text": ">10"}]}, (105.5, None, 10.0, None, None)),
        ({"referenceRange": [{"text": "negative"}]}, (105.5, None, None, None, "negative")),
        (
            {"referenceRange": [{"low": {"value": 1}, "text": "1 or more"}]},
            (105.5, None, 1.0, None, "1 or more"),
        ),
    ],
)
def test_observation_values_and_ranges(changes: dict[str, Any], expected: tuple[Any, ...]) -> None:
    row = good(run("results", bundle(with_(OBSERVATION, **changes)))).row(0, named=True)
    got = (
        row["value_num"],
        row["value_text"],
        row["reference_low"],
        row["reference_high"],
        row["reference_text"],
    )
    assert got == expected


def test_appointment_fields_and_duration() -> None:
    row = good(run("appointments", bundle(APPOINTMENT))).row(0, named=True)
    assert row["patient_source_id"] == "pat-1"
    assert (row["status"], row["status_source"]) == ("booked", "booked")
    assert row["start_at"] == datetime(2026, 11, 3, 13, 0, tzinfo=UTC)
    assert row["end_at"] == datetime(2026, 11, 3, 13, 20, tzinfo=UTC)
    assert row["duration_min"] == 20  # derived from start/end: minutesDuration absent
    assert (row["type_code"], row["type_display"]) == ("FOLLOWUP", "A follow up visit")
    assert row["location"] == "Clinic B"
    assert (row["provider_id"], row["provider_name"]) == ("111", "Sharon Chalk")
    assert row["reason"] == "Follow up"
    explicit = good(run("appointments", bundle(with_(APPOINTMENT, minutesDuration=45)))).row(0, named=True)
    assert explicit["duration_min"] == 45


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01T09:30:00-04:00", datetime(2026, 11, 1, 13, 30, tzinfo=UTC)),
        ("2026-11-01T09:30:00.123456+05:30", datetime(2026, 11, 1, 4, 0, 0, 123456, tzinfo=UTC)),
        ("2026-11-01T13:30:00Z", datetime(2026, 11, 1, 13, 30, tzinfo=UTC)),
        ("2026-11-01T13:30:00", datetime(2026, 11, 1, 13, 30, tzinfo=UTC)),  # no offset: taken as UTC
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),  # partial: start of the period
        ("2026-11", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026", datetime(2026, 1, 1, tzinfo=UTC)),
    ],
)
def test_datetime_rule(text: str, expected: datetime) -> None:
    row = good(run("results", bundle(with_(OBSERVATION, effectiveDateTime=text)))).row(0, named=True)
    assert row["effective_at"] == expected


def test_partial_birth_date_is_null_not_quarantined() -> None:
    out = run(
        "patients", bundle(with_(PATIENT, birthDate="2008-01"), with_(PATIENT, id="p2", birthDate="2008"))
    )
    assert good(out).height == 2
    assert good(out)["birth_date"].null_count() == 2


def test_missing_optional_fields_give_nulls() -> None:
    bare = {
        "resourceType": "Encounter",
        "id": "e",
        "status": "planned",
        "subject": {"reference": "Patient/p"},
    }
    row = good(run("encounters", bundle(bare))).row(0, named=True)
    assert row["class"] is None and row["start_at"] is None and row["source_updated_at"] is None
    assert row["attending_provider_id"] is None and row["location"] is None


# --- ValueSets -----------------------------------------------------------------------------------

CODED = [
    ("patients", PATIENT, "gender", "sex", "sex"),
    ("encounters", ENCOUNTER, "status", "status", "encounter_status"),
    ("appointments", APPOINTMENT, "status", "status", "appointment_status"),
    ("results", OBSERVATION, "status", "status", "result_status"),
]


@pytest.mark.parametrize(("entity", "base", "field", "column", "valueset"), CODED)
def test_every_code_of_each_valueset(
    entity: str, base: dict[str, Any], field: str, column: str, valueset: str
) -> None:
    table = valuesets.CODE_MAPS[("fhir", valueset)]
    codes = [*table, "something-new"]
    resources = [with_(base, id=f"r{i}", **{field: code}) for i, code in enumerate(codes)]
    out = good(run(entity, bundle(*resources)))
    mapped = dict(zip(out[f"{column}_source"], out[column], strict=True))
    assert mapped == {**dict(table), "something-new": "unknown"}
    assert set(out[column]) <= set(schema.VALUESETS[valueset])
    assert valuesets.unmapped_counts(out, TABLE[entity], "fhir")[column] == 1


def test_encounter_class_and_interpretation_codes() -> None:
    classes = list(valuesets.FHIR_ENCOUNTER_CLASS)
    enc = [with_(ENCOUNTER, id=f"e{i}", **{"class": {"code": c.upper()}}) for i, c in enumerate(classes)]
    out = good(run("encounters", bundle(*enc)))
    assert dict(zip(out["class_source"], out["class"], strict=True)) == {
        c.upper(): v for c, v in valuesets.FHIR_ENCOUNTER_CLASS.items()
    }
    flags = list(valuesets.FHIR_ABNORMAL_FLAG)
    obs = [
        with_(OBSERVATION, id=f"o{i}", interpretation=[{"coding": [{"code": f.upper()}]}])
        for i, f in enumerate(flags)
    ]
    out = good(run("results", bundle(*obs)))
    assert dict(zip(out["abnormal_flag_source"], out["abnormal_flag"], strict=True)) == {
        f.upper(): v for f, v in valuesets.FHIR_ABNORMAL_FLAG.items()
    }
    assert set(out["abnormal_flag"]) <= set(schema.VALUESETS["abnormal_flag"])


# --- quarantine ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entity", "resource", "reason"),
    [
        ("encounters", with_(ENCOUNTER, id=None), "id: missing"),
        (
            "encounters",
            with_(ENCOUNTER, subject={"reference": "Group/1"}),
            "subject: missing Patient reference",
        ),
        ("encounters", with_(ENCOUNTER, status=None), "status: missing"),
        (
            "encounters",
            with_(ENCOUNTER, period={"start": "2021-02-30T25:61:00"}),
            "period.start: unparseable datetime",
        ),
        ("encounters", with_(ENCOUNTER, period={"start": {"nested": 1}}), "period.start: wrong JSON type"),
        ("encounters", with_(ENCOUNTER, status=1), "status: wrong JSON type"),
        ("patients", with_(PATIENT, birthDate="2008-02-30"), "birthDate: unparseable date"),
        ("patients", with_(PATIENT, birthDate=19_700_101), "birthDate: wrong JSON type"),
        (
            "patients",
            with_(PATIENT, meta={"lastUpdated": "not-a-date"}),
            "meta.lastUpdated: unparseable datetime",
        ),
        ("patients", with_(PATIENT, resourceType=None), "resourceType: missing"),
        ("patients", with_(PATIENT, name={"family": "x"}), "name: wrong JSON type"),
        (
            "results",
            with_(OBSERVATION, valueQuantity={"value": "not-a-number"}),
            "valueQuantity.value: wrong JSON type",
        ),
        ("results", with_(OBSERVATION, code={"text": "no coding"}), "code: missing coding"),
        ("appointments", with_(APPOINTMENT, participant=None), "subject: missing Patient reference"),
        (
            "appointments",
            with_(APPOINTMENT, minutesDuration=12.5),
            "minutesDuration: not a non-negative integer",
        ),
        ("appointments", with_(APPOINTMENT, end="2026-11-03T07:00:00-05:00"), "end: before start"),
    ],
)
def test_bad_records_are_quarantined_with_a_field_reason(
    entity: str, resource: dict[str, Any], reason: str
) -> None:
    fine = {
        "encounters": ENCOUNTER,
        "patients": PATIENT,
        "results": OBSERVATION,
        "appointments": APPOINTMENT,
    }[entity]
    out = run(entity, bundle(with_(fine, id="fine"), resource))
    assert good(out)["source_id"].to_list() == ["fine"]
    q = bad(out).row(0, named=True)
    assert reason in q["quarantine_reason"]
    assert q["raw_ref"] == "fhir/x/day=2026-11-01/page-00000"
    assert json.loads(q["raw"]) == resource  # the record exactly, for replay
    good_part, bad_part = common.split(out.lazy())
    assert good_part.collect().schema == schema.TABLES[TABLE[entity]]
    quarantine = bad_part.collect()
    assert quarantine.schema == schema.QUARANTINE
    assert quarantine.row(0, named=True)["entity"] == TABLE[entity]


def test_reasons_carry_no_values() -> None:
    out = run("patients", bundle(with_(PATIENT, birthDate="1999-02-31", meta={"lastUpdated": "Timothy"})))
    reason = bad(out)["quarantine_reason"][0]
    assert "1999" not in reason and "Timothy" not in reason
    assert reason == "meta.lastUpdated: unparseable datetime; birthDate: unparseable date"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('{"resourceType":"Bundle","entry":[{"resource":', "page: invalid JSON"),
        ("", "page: empty body"),
        ("[1, 2]", "page: not a JSON object"),
        ('{"resourceType":"OperationOutcome","issue":[]}', "page: OperationOutcome instead of a Bundle"),
        ('{"resourceType":"Patient","id":"x"}', "page: not a FHIR Bundle"),
        ('{"resourceType":"Bundle","entry":{"resource":{}}}', "page: Bundle.entry is not a list"),
    ],
)
def test_bad_page_is_one_quarantine_row(body: str, reason: str) -> None:
    out = run("encounters", bundle(ENCOUNTER), body)
    assert good(out).height == 1
    q = bad(out).row(0, named=True)
    assert q["quarantine_reason"] == reason
    assert q["raw"] == body and q["raw_ref"].endswith("page-00001")
    assert q["source_id"] is None


def test_other_resource_types_are_skipped_and_counted() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "processing"}]}
    included = {"resourceType": "Patient", "id": "pat-1", "name": {"wrong": "shape for an Encounter"}}
    body = bundle(ENCOUNTER, outcome, included)
    out = run("encounters", body)
    assert out["source_id"].to_list() == ["enc-1"]
    counted = fhir.count_entries(pages(body), "encounters").collect().row(0, named=True)
    assert counted == {"records": 1, "skipped": 2, "pages": 1}


def test_malformed_entries_are_records() -> None:
    body = bundle(ENCOUNTER, raw_entries=[None, {"resource": "x"}, {"fullUrl": "no resource"}])
    out = run("encounters", body)
    assert sorted(bad(out)["quarantine_reason"]) == [
        "entry: not an object",
        "resource: missing",
        "resource: wrong JSON type",
    ]


def test_empty_bundle_gives_no_rows() -> None:
    out = run("appointments", json.dumps({"resourceType": "Bundle", "type": "searchset", "total": 0}))
    assert out.height == 0


# --- dedupe --------------------------------------------------------------------------------------


def test_duplicates_across_pages_keep_the_newest() -> None:
    older = with_(ENCOUNTER, status="in-progress", meta={"lastUpdated": "2026-11-01T10:00:00-04:00"})
    newer = with_(ENCOUNTER, status="finished", meta={"lastUpdated": "2026-11-01T11:00:00-04:00"})
    out = run("encounters", bundle(newer, ENCOUNTER | {"id": "other"}), bundle(older))
    row = good(out).filter(pl.col("source_id") == "enc-1").row(0, named=True)
    assert row["status"] == "finished" and row["duplicates"] == 1
    assert good(out).height == 2


def test_duplicates_with_equal_timestamps_keep_the_last_seen() -> None:
    first = with_(ENCOUNTER, reasonCode=[{"text": "first"}])
    last = with_(ENCOUNTER, reasonCode=[{"text": "last"}])
    out = run("encounters", bundle(first), bundle(last))
    assert good(out)["reason"].to_list() == ["last"]


def test_dedupe_function_passes_quarantine_through() -> None:
    frame = pl.LazyFrame(
        {
            "source_surface": ["fhir"] * 4,
            "source_id": ["a", "a", "a", "b"],
            "source_updated_at": [datetime(2026, 1, d, tzinfo=UTC) for d in (2, 3, 1, 1)],
            "quarantine_reason": [None, None, "x: bad", None],
            "_seq": [0, 1, 2, 3],
        }
    )
    out = common.dedupe(frame).collect().sort("_seq")
    assert out["_seq"].to_list() == [1, 2, 3]
    assert out["duplicates"].to_list() == [1, 0, 0]


# --- referenced_patients --------------------------------------------------------------------------


def _ref_pages() -> pl.LazyFrame:
    encounter = {"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/p1"}}
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "subject": {"reference": "https://fhir.example.org/R4/Patient/p2/_history/3"},
    }
    appointment = {
        "resourceType": "Appointment",
        "id": "a1",
        "participant": [
            {"actor": {"reference": "Practitioner/dr"}},
            {"actor": {"reference": "Patient/p3"}},
            {"actor": {"reference": "Patient/p4"}},
        ],
    }
    warning = {"resourceType": "OperationOutcome", "id": "w", "subject": {"reference": "Patient/nobody"}}
    # A subject of the wrong JSON type makes the narrow decode fail: the page takes the repair path,
    # and its well-typed references still count.
    broken = {"resourceType": "Encounter", "id": "e2", "subject": "Patient/p9"}
    repaired = {"resourceType": "Encounter", "id": "e3", "subject": {"reference": "Patient/p5"}}
    return pages(
        bundle(encounter, warning),
        bundle(observation, {**observation, "id": "o2"}),
        bundle(appointment),
        bundle(broken, repaired),
        "not json",
    )


def test_referenced_patients_reads_what_the_normalizers_read() -> None:
    got = set(references.fhir_referenced_patients(_ref_pages()).collect()["source_id"])
    assert got == {"p1", "p2", "p3", "p5"}
    normalized = set()
    for entity in ("encounters", "results", "appointments"):
        frame = getattr(fhir, entity)(_ref_pages()).collect()
        normalized |= set(frame["patient_source_id"].drop_nulls())
    assert got == normalized


def test_referenced_patients_decodes_references_only() -> None:
    before = dict(common.DECODED_PAGES)
    references.fhir_referenced_patients(_ref_pages()).collect()
    after = common.DECODED_PAGES
    assert after["references"] - before.get("references", 0) == 5
    assert after["normalize"] == before.get("normalize", 0)
