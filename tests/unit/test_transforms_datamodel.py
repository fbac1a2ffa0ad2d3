"""Data Model responses -> unified tables: every shipped example payload, values, quarantine, dedupe."""

import copy
import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import schema
from transforms import common, datamodel, valuesets
from transforms.datamodel import locate

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "redox-datamodel"
ENTITIES = ("patients", "encounters", "appointments", "results")
FAMILIES = ("patientadmin", "scheduling", "results", "patientsearch", "clinicalsummary")
CS_RESULTS = [
    "43789009|26515-7|2012-08-10T14:00:00.000Z",
    "43789009|30313-1|2012-08-10T14:00:00.000Z",
    "43789009|33765-9|2012-08-10T14:00:00.000Z",
    "624-7|86243-3|2012-08-10T14:00:00.000Z",
]
CS = {
    "patients": ["2.16.840.1.113883.4.6:1234"],
    "encounters": ["URMC Epic CSN:2376492"],
    "results": CS_RESULTS,
}
TIM = {"patients": ["0000000001"]}
# fixture -> entity -> source ids produced (entities not named produce no rows at all).
EXPECTED: dict[str, dict[str, list[str]]] = {
    "clinicalsummary_documentget": {},
    "clinicalsummary_documentgetresponse": {},
    "clinicalsummary_documentquery": {},
    "clinicalsummary_documentqueryresponse": TIM,
    "clinicalsummary_patientpush": CS,
    "clinicalsummary_patientquery": {},
    "clinicalsummary_patientqueryresponse": CS,
    "clinicalsummary_visitpush": CS,
    "clinicalsummary_visitquery": {},
    "clinicalsummary_visitqueryresponse": CS,
    "patientadmin_arrival": {**TIM, "encounters": ["1234"]},
    "patientadmin_cancel": {**TIM, "encounters": ["1234"]},
    "patientadmin_censusquery": {},
    "patientadmin_censusqueryresponse": {**TIM, "encounters": ["1234"]},
    "patientadmin_discharge": {**TIM, "encounters": ["1234"]},
    "patientadmin_newpatient": TIM,
    "patientadmin_patientmerge": TIM,
    "patientadmin_patientupdate": TIM,
    "patientadmin_preadmit": {**TIM, "encounters": ["1234"]},
    "patientadmin_registration": {**TIM, "encounters": ["1234"]},
    "patientadmin_transfer": {**TIM, "encounters": ["1234"]},
    "patientadmin_visitmerge": {**TIM, "encounters": ["123456"]},
    "patientadmin_visitquery": {},
    "patientadmin_visitqueryresponse": {**TIM, "encounters": ["1234"]},
    "patientadmin_visitupdate": {**TIM, "encounters": ["1234"]},
    "patientsearch_locationquery": {},
    "patientsearch_locationqueryresponse": TIM,
    "patientsearch_query": {},
    "patientsearch_response": TIM,
    "results_new": {**TIM, "results": ["157968300|TEST0001", "157968300|TEST0004"]},
    "results_newunsolicited": {**TIM, "results": ["1234|TEST0001", "1234|TEST0004"]},
    "results_query": {},
    "results_queryresponse": {
        "patients": ["000000001"],
        "results": ["157968300|TEST0001", "157968300|TEST0004"],
    },
    "scheduling_availableslots": {},
    "scheduling_availableslotsresponse": {},
    "scheduling_booked": {},
    "scheduling_bookedresponse": {
        "patients": ["0000000001", "0000000002", "0000000003"],
        "appointments": ["1234", "1235", "1236"],
    },
    "scheduling_cancel": {**TIM, "appointments": ["1234"]},
    "scheduling_modification": {**TIM, "appointments": ["1234"]},
    "scheduling_new": {**TIM, "appointments": ["1234"]},
    "scheduling_noshow": {**TIM, "appointments": ["1234"]},
    "scheduling_pushslots": {},
    "scheduling_reschedule": {**TIM, "appointments": ["1234"]},
}


def fixture(name: str) -> str:
    return (FIXTURES / f"{name}.json").read_text()


def pages(*bodies: str) -> pl.LazyFrame:
    return pl.LazyFrame(
        {
            "raw_ref": [f"datamodel/x/day=2026-11-01/page-{i:05d}" for i in range(len(bodies))],
            "body": list(bodies),
        },
        schema={"raw_ref": pl.String(), "body": pl.String()},
    )


def run(entity: str, *bodies: str, **kwargs: Any) -> pl.DataFrame:
    out = getattr(datamodel, entity)(pages(*bodies), **kwargs).collect()
    assert out.schema == common.normalized_schema(entity)
    counted = datamodel.count_records(pages(*bodies), entity).collect().row(0, named=True)
    tally = common.tally(out)
    assert counted["records"] == tally["good"] + tally["duplicates"] + tally["quarantined"]
    assert counted["pages"] == len(bodies)
    return out


def local_id(source_id: pl.Expr) -> pl.Expr:
    """A clinical key without its patient scope ('<patient>/<id>' -> '<id>'); patients unchanged."""
    return source_id.str.replace(r"^[^/]*/", "")


def one(out: pl.DataFrame, source_id: str) -> dict[str, Any]:
    """The row whose id at the source is ``source_id`` (clinical keys are scoped by patient)."""
    rows = out.filter((pl.col("source_id") == source_id) | (local_id(pl.col("source_id")) == source_id))
    assert rows.height == 1
    return rows.row(0, named=True)


def good(out: pl.DataFrame) -> pl.DataFrame:
    return out.filter(pl.col("quarantine_reason").is_null())


def bad(out: pl.DataFrame) -> pl.DataFrame:
    return out.filter(pl.col("quarantine_reason").is_not_null())


def test_the_expectation_table_covers_every_fixture_of_the_families() -> None:
    names = {p.stem for p in FIXTURES.glob("*.json") if p.stem.split("_")[0] in FAMILIES}
    assert names == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("entity", ENTITIES)
def test_every_fixture_normalizes_without_error(name: str, entity: str) -> None:
    out = run(entity, fixture(name))
    assert bad(out).height == 0, bad(out)["quarantine_reason"].to_list()
    assert sorted(out.select(local_id(pl.col("source_id")))["source_id"].to_list()) == EXPECTED[name].get(
        entity, []
    )
    assert out["source_surface"].to_list() == ["datamodel"] * out.height
    good_part, bad_part = common.split(out.lazy())
    assert good_part.collect().schema == schema.TABLES[entity]
    assert bad_part.collect().schema == schema.QUARANTINE


def test_all_fixtures_in_one_batch_dedupe_to_distinct_records() -> None:
    bodies = [fixture(name) for name in sorted(EXPECTED)]
    out = run("patients", *bodies)
    assert sorted(out["source_id"]) == [
        "0000000001",
        "0000000002",
        "0000000003",
        "000000001",
        "2.16.840.1.113883.4.6:1234",
    ]


# --- concrete values -----------------------------------------------------------------------------


def test_timothy_bixby_from_patient_search() -> None:
    row = one(run("patients", fixture("patientsearch_response")), "0000000001")
    assert (row["given_name"], row["middle_name"], row["family_name"]) == ("Timothy", "Paul", "Bixby")
    assert row["birth_date"] == date(2008, 1, 6)
    assert (row["sex"], row["sex_source"]) == ("male", "Male")
    assert row["ssn"] == "101-01-0001"
    assert row["identifiers"] == [
        {"system": "urn:redox:dm:MR", "value": "0000000001"},
        {"system": "urn:redox:dm:EHRID", "value": "e167267c-16c9-4fe3-96ae-9cff5703e90a"},
        {"system": "urn:redox:dm:NIST", "value": "a1d4ee8aba494ca"},
    ]
    assert (row["address_line"], row["address_city"], row["address_state"], row["address_postal_code"]) == (
        "4762 Hickory Street",
        "Monroe",
        "WI",
        "53566",
    )
    assert row["phone"] == "+18088675301"
    assert row["email"] is None
    assert row["source_updated_at"] == datetime(2023, 2, 27, 22, 9, 3, 585000, tzinfo=UTC)


def test_clinical_summary_patient_oid_identifier_and_email_objects() -> None:
    row = one(run("patients", fixture("clinicalsummary_visitqueryresponse")), "2.16.840.1.113883.4.6:1234")
    assert row["identifiers"] == [{"system": "urn:oid:2.16.840.1.113883.4.6", "value": "1234"}]
    assert (row["given_name"], row["family_name"], row["birth_date"]) == ("Myra", "Jones", date(1947, 5, 1))
    assert row["email"] is not None  # sent as [{"Address": ...}], normalized to the string
    assert row["sex"] == "female"


def test_booked_response_patients_and_appointments() -> None:
    body = fixture("scheduling_bookedresponse")
    barbara = one(run("patients", body), "0000000002")
    assert (barbara["given_name"], barbara["family_name"], barbara["birth_date"]) == (
        "Barbara",
        "Bixby",
        date(1982, 7, 24),
    )
    assert barbara["phone"] == "+18088675303"  # Home before Mobile before Office
    appt = one(run("appointments", body), "1234")
    assert appt["patient_source_id"] == "0000000001"
    assert appt["start_at"] == datetime(2016, 8, 1, 10, 0, tzinfo=UTC)
    assert appt["end_at"] == datetime(2016, 8, 1, 10, 15, tzinfo=UTC)
    assert appt["duration_min"] == 15
    assert (appt["location"], appt["reason"]) == ("Clinic A", "Follow Up")
    assert (appt["provider_id"], appt["provider_name"]) == ("4356789876", "Pat Granite")
    assert appt["status"] is None  # BookedResponse example sends no Status


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("scheduling_new", "booked"),
        ("scheduling_reschedule", "booked"),
        ("scheduling_modification", "booked"),
        ("scheduling_cancel", "cancelled"),
        ("scheduling_noshow", "noshow"),
    ],
)
def test_scheduling_events_give_status_from_event_type(name: str, status: str) -> None:
    row = one(run("appointments", fixture(name)), "1234")
    assert row["status"] == status
    assert row["status_source"] == json.loads(fixture(name))["Meta"]["EventType"]


def test_visit_query_response_encounter() -> None:
    row = one(run("encounters", fixture("patientadmin_visitqueryresponse")), "1234")
    assert row["patient_source_id"] == "0000000001"
    assert (row["class"], row["class_source"]) == ("inpatient", "Inpatient")
    assert (row["status"], row["status_source"]) == ("arrived", "Arrived")
    assert row["start_at"] == datetime(2023, 2, 27, 22, 9, 4, 646000, tzinfo=UTC)
    assert (row["location"], row["reason"]) == ("3N", "Check up")


def test_discharge_gives_end_and_attending() -> None:
    row = one(run("encounters", fixture("patientadmin_discharge")), "1234")
    assert row["start_at"] == datetime(2023, 2, 26, 22, 9, 4, 581000, tzinfo=UTC)
    assert row["end_at"] == datetime(2023, 2, 27, 22, 9, 4, 581000, tzinfo=UTC)
    assert (row["attending_provider_id"], row["attending_provider_name"]) == ("4356789876", "Pat Granite")


def test_clinical_summary_encounter() -> None:
    row = one(run("encounters", fixture("clinicalsummary_visitqueryresponse")), "URMC Epic CSN:2376492")
    assert row["patient_source_id"] == "2.16.840.1.113883.4.6:1234"
    assert (row["type_code"], row["type_system"], row["type_display"]) == (
        "99222",
        "http://www.ama-assn.org/go/cpt",
        "InPatient Admission",
    )
    assert row["start_at"] == datetime(2012, 8, 6, 4, 0, tzinfo=UTC)
    assert (row["location"], row["reason"]) == ("Community Health and Hospitals", "Pneumonia")


def test_results_query_response() -> None:
    out = run("results", fixture("results_queryresponse"))
    row = one(out, "157968300|TEST0001")
    assert (row["order_id"], row["patient_source_id"]) == ("157968300", "000000001")
    assert (row["code"], row["display"]) == ("TEST0001", "Cystic Fibrosis")
    assert (row["value_num"], row["value_text"]) == (None, "Positive Result")
    assert (row["abnormal_flag"], row["abnormal_flag_source"]) == ("abnormal", "Very Abnormal")
    assert (row["status"], row["status_source"]) == ("final", "Final")
    assert row["effective_at"] == datetime(2015, 5, 6, 6, 0, 58, 872000, tzinfo=UTC)  # CollectionDateTime
    assert row["source_updated_at"] == datetime(
        2015, 5, 6, 6, 0, 58, 872000, tzinfo=UTC
    )  # TransactionDateTime
    assert one(out, "157968300|TEST0004")["abnormal_flag"] == "normal"


def test_clinical_summary_numeric_observation() -> None:
    row = one(run("results", fixture("clinicalsummary_patientqueryresponse")), CS_RESULTS[1])
    assert (row["code"], row["code_system"], row["display"]) == ("30313-1", "http://loinc.org", "HGB")
    # The source's own spelling of the system is kept beside the canonical URI.
    assert row["code_system_source"] == "2.16.840.1.113883.6.1"
    assert (row["value_type"], row["value_num"], row["unit"]) == ("quantity", 10.2, "g/dl")
    assert (row["value_num"], row["value_text"], row["unit"]) == (10.2, None, "g/dl")
    assert row["order_id"] is None


# --- the sandbox's response shapes, with the sandbox's codes -------------------------------------

META = {"DataModel": "Results", "EventType": "QueryResponse", "EventDateTime": "2026-11-02T00:00:00.000Z"}


def order(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ID": "ORD1",
        "TransactionDateTime": "2026-11-01T15:00:00.000Z",
        "LastUpdated": "2026-11-01T15:00:00.000Z",
        "CollectionDateTime": "2026-11-01T14:00:00.000Z",
        "CompletionDateTime": "2026-11-01T14:30:00.000Z",
        "Patient": {"Identifiers": [{"ID": "MRN1", "IDType": "MR"}]},
        "Results": [
            {
                "Code": "2345-7",
                "Codeset": "LOINC",
                "Description": "Glucose",
                "Value": "105.5",
                "ValueType": "Numeric",
                "Units": "mg/dL",
                "AbnormalFlag": "High",
                "Status": "Final",
                "CompletionDateTime": "2026-11-01T14:10:00.000Z",
                "ReferenceRange": {"Low": 70, "High": 99, "Text": None},
            }
        ],
    }
    base.update(changes)
    return base


def results_body(*orders: dict[str, Any], meta: dict[str, Any] | None = None) -> str:
    return json.dumps({"Meta": meta or META, "Orders": list(orders)})


def test_sandbox_order_shape() -> None:
    row = one(run("results", results_body(order())), "ORD1|2345-7")
    assert (row["value_num"], row["value_text"], row["unit"]) == (105.5, None, "mg/dL")
    assert (row["reference_low"], row["reference_high"], row["reference_text"]) == (70.0, 99.0, None)
    assert (row["abnormal_flag"], row["code_system"], row["code_system_source"]) == (
        "high",
        "http://loinc.org",
        "LOINC",
    )
    assert row["effective_at"] == datetime(2026, 11, 1, 14, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    ("rng", "expected"),
    [
        ({"Text": "3.5-5.0"}, (3.5, 5.0, None)),
        ({"Text": "<5"}, (None, 5.0, None)),
        ({"Text": ">10"}, (10.0, None, None)),
        ({"Text": "Negative"}, (None, None, "Negative")),
        ({"Low": "3.5", "High": "5.0"}, (3.5, 5.0, None)),
    ],
)
def test_reference_ranges(rng: dict[str, Any], expected: tuple[Any, ...]) -> None:
    o = order()
    o["Results"][0]["ReferenceRange"] = rng
    row = one(run("results", results_body(o)), "ORD1|2345-7")
    assert (row["reference_low"], row["reference_high"], row["reference_text"]) == expected


def test_result_status_and_flag_codes() -> None:
    flags = [*valuesets.DM_ABNORMAL_FLAG, "Weird"]
    o = order()
    o["Results"] = [
        {**o["Results"][0], "Code": f"C{i}", "AbnormalFlag": f.title(), "Status": "Preliminary"}
        for i, f in enumerate(flags)
    ]
    out = good(run("results", results_body(o)))
    mapped = dict(zip(out["abnormal_flag_source"], out["abnormal_flag"], strict=True))
    assert mapped == {**{f.title(): v for f, v in valuesets.DM_ABNORMAL_FLAG.items()}, "Weird": "unknown"}
    assert valuesets.unmapped_counts(out, "results", "datamodel") == {
        "abnormal_flag": 1,
        "status": 0,
        "code_system": 0,
        "value_code_system": 0,
    }


def visits_body(*visits: dict[str, Any], patient: dict[str, Any] | None = None) -> str:
    patient = patient or {"Identifiers": [{"ID": "MRN1", "IDType": "MR"}], "Demographics": {"FirstName": "A"}}
    meta = {
        "DataModel": "PatientAdmin",
        "EventType": "VisitQueryResponse",
        "EventDateTime": "2026-11-02T00:00:00.000Z",
    }
    return json.dumps({"Meta": meta, "Patients": [{**patient, "Visits": list(visits)}]})


VISIT = {
    "VisitNumber": "V1",
    "VisitDateTime": "2026-11-01T14:00:00.000Z",
    "PatientClass": "Outpatient",
    "Status": "Completed",
    "Reason": "Check up",
    "Location": {"Department": "Clinic A"},
}


@pytest.mark.parametrize("field", ["encounter_class", "encounter_status"])
def test_encounter_codes(field: str) -> None:
    key = {"encounter_class": "PatientClass", "encounter_status": "Status"}[field]
    table = valuesets.CODE_MAPS[("datamodel", field)]
    visits = [{**VISIT, "VisitNumber": f"V{i}", key: code.title()} for i, code in enumerate(table)]
    out = good(run("encounters", visits_body(*visits)))
    column = {"encounter_class": "class", "encounter_status": "status"}[field]
    assert dict(zip(out[f"{column}_source"], out[column], strict=True)) == {
        c.title(): v for c, v in table.items()
    }


def test_appointment_status_codes_from_the_sandbox() -> None:
    statuses = ["Scheduled", "Arrived", "Completed", "Canceled", "No Show", "Entered in Error", "Unknown"]
    meta = {
        "DataModel": "Scheduling",
        "EventType": "BookedResponse",
        "EventDateTime": "2026-11-02T00:00:00.000Z",
    }
    visits = [
        {
            **VISIT,
            "VisitNumber": f"A{i}",
            "Status": s,
            "Duration": 15,
            "Patient": {"Identifiers": [{"ID": "M", "IDType": "MR"}]},
        }
        for i, s in enumerate(statuses)
    ]
    out = good(run("appointments", json.dumps({"Meta": meta, "Visits": visits})))
    assert dict(zip(out["status_source"], out["status"], strict=True)) == {
        "Scheduled": "booked",
        "Arrived": "arrived",
        "Completed": "fulfilled",
        "Canceled": "cancelled",
        "No Show": "noshow",
        "Entered in Error": "entered-in-error",
        "Unknown": "unknown",
    }


# --- identifiers ---------------------------------------------------------------------------------


def test_patient_id_rule_and_parameter() -> None:
    ids = [{"ID": "E1", "IDType": "EHRID"}, {"ID": "N1", "IDType": "MRN"}, {"ID": "M1", "IDType": "MR"}]
    body = visits_body(VISIT, patient={"Identifiers": ids})
    assert one(run("encounters", body), "V1")["patient_source_id"] == "M1"
    assert one(run("encounters", body, preferred_id_types=("MRN",)), "V1")["patient_source_id"] == "N1"
    assert one(run("encounters", body, preferred_id_types=("XX",)), "V1")["patient_source_id"] == "EHRID:E1"


def test_identifier_systems() -> None:
    ids = [
        {"ID": "1", "IDType": "MR"},
        {"ID": "2", "IDType": "2.16.840.1.113883.4.6"},
        {"ID": "3", "IDType": "http://hl7.org/fhir/sid/us-npi"},
        {"ID": "123-45-6789", "IDType": "SSN"},
    ]
    row = one(run("patients", visits_body(VISIT, patient={"Identifiers": ids, "Demographics": {}})), "1")
    assert row["identifiers"] == [
        {"system": "urn:redox:dm:MR", "value": "1"},
        {"system": "urn:oid:2.16.840.1.113883.4.6", "value": "2"},
        {"system": "http://hl7.org/fhir/sid/us-npi", "value": "3"},
    ]
    assert row["ssn"] == "123-45-6789"


# --- quarantine ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"VisitNumber": None}, "Visit.VisitNumber: missing"),
        ({"VisitDateTime": 20_210_230}, "Visit.VisitDateTime: unparseable datetime"),
        ({"VisitDateTime": "2021-02-30T25:61:00.000Z"}, "Visit.VisitDateTime: unparseable datetime"),
        ({"Location": "Clinic A"}, "Patients[].Visits[].Location: wrong JSON type"),
    ],
)
def test_bad_visits_are_quarantined(change: dict[str, Any], reason: str) -> None:
    broken = {**VISIT, "VisitNumber": "BAD", **change}
    if change.get("VisitNumber", "") is None:
        broken.pop("VisitNumber")
    out = run("encounters", visits_body(VISIT, broken))
    assert good(out).select(local_id(pl.col("source_id")))["source_id"].to_list() == ["V1"]
    q = bad(out).row(0, named=True)
    assert q["quarantine_reason"] == reason
    assert json.loads(q["raw"]) == broken


def test_appointment_duration_must_be_whole_minutes() -> None:
    meta = {
        "DataModel": "Scheduling",
        "EventType": "BookedResponse",
        "EventDateTime": "2026-11-02T00:00:00.000Z",
    }
    patient = {"Identifiers": [{"ID": "M", "IDType": "MR"}]}
    visits = [
        {**VISIT, "VisitNumber": "ok", "Duration": "30", "Patient": patient},
        {**VISIT, "VisitNumber": "words", "Duration": "fifteen minutes", "Patient": patient},
        {**VISIT, "VisitNumber": "half", "Duration": 7.5, "Patient": patient},
    ]
    out = run("appointments", json.dumps({"Meta": meta, "Visits": visits}))
    assert one(out, "ok")["duration_min"] == 30
    assert one(out, "words")["quarantine_reason"] == "Visit.Duration: not a whole number of minutes"
    assert one(out, "half")["quarantine_reason"] == "Visit.Duration: not a whole number of minutes"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda o: o.update(Results={"Code": "ORD1"}), "Orders[].Results: wrong JSON type"),
        (lambda o: o.pop("ID"), "Order.ID: missing"),
        (
            lambda o: o.update(CompletionDateTime="2021-02-30T25:61:00.000Z"),
            "Order.CompletionDateTime: unparseable datetime",
        ),
        (lambda o: o["Results"][0].update(Value="high"), "Value: not a number although ValueType is numeric"),
        (lambda o: o.update(Patient={"Identifiers": []}), "Patient.Identifiers: no usable ID"),
        (
            lambda o: o.update(Patient={"Identifiers": "MRN1"}),
            "Orders[].Patient.Identifiers: wrong JSON type",
        ),
    ],
)
def test_bad_orders_are_quarantined(mutate: Any, reason: str) -> None:
    broken = order(ID="BAD")
    mutate(broken)
    out = run("results", results_body(order(), broken))
    assert good(out).select(local_id(pl.col("source_id")))["source_id"].to_list() == ["ORD1|2345-7"]
    assert bad(out)["quarantine_reason"].to_list() == [reason]
    assert bad(out)["raw"][0] is not None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('{"Meta": {"DataModel": "Results"', "page: invalid JSON"),
        ('{"errorDetail": "upstream timeout"}', "page: not a Data Model response (no Meta)"),
        ("[]", "page: not a JSON object"),
        (
            json.dumps(
                {"Meta": {**META, "Errors": [{"ID": 1, "Text": "No subscriptions", "Type": "message"}]}}
            ),
            "page: Meta.Errors present (Redox reported a failed request)",
        ),
    ],
)
@pytest.mark.parametrize("entity", ENTITIES)
def test_bad_pages_are_one_quarantine_row(entity: str, body: str, reason: str) -> None:
    out = run(entity, body)
    assert out.height == 1
    row = out.row(0, named=True)
    assert (row["quarantine_reason"], row["raw"], row["source_id"]) == (reason, body, None)


def test_reasons_carry_no_phi() -> None:
    broken = copy.deepcopy(json.loads(fixture("patientsearch_response")))
    broken["Patient"]["Demographics"]["DOB"] = "2008-13-45"
    row = run("patients", json.dumps(broken)).row(0, named=True)
    assert row["quarantine_reason"] == "Demographics.DOB: unparseable date"


# --- dedupe --------------------------------------------------------------------------------------


def test_patients_keep_the_most_complete_then_newest() -> None:
    stub = results_body(order())  # Orders[].Patient: identifiers only
    full = visits_body(
        VISIT,
        patient={
            "Identifiers": [{"ID": "MRN1", "IDType": "MR"}],
            "Demographics": {"FirstName": "Ann", "LastName": "Lee"},
        },
    )
    out = run("patients", full, stub)
    row = one(out, "MRN1")
    assert (row["given_name"], row["family_name"], row["duplicates"]) == ("Ann", "Lee", 1)


def test_duplicate_visits_across_pages_keep_one() -> None:
    first = visits_body({**VISIT, "Reason": "first"})
    second = visits_body({**VISIT, "Reason": "second"})
    out = run("encounters", first, second)
    row = one(out, "V1")
    assert (row["reason"], row["duplicates"]) == ("second", 1)


# --- decode once: carried patients, shared count -------------------------------------------------


def _same_rows(left: pl.DataFrame, right: pl.DataFrame) -> bool:
    """Equal as multisets of rows (dedupe does not promise an order)."""
    return left.schema == right.schema and sorted(map(repr, left.rows())) == sorted(map(repr, right.rows()))


def _carried_pages(*bodies: str) -> pl.LazyFrame:
    parsed = [common.load_json(b)[0] for b in bodies]
    return pages(*bodies).with_columns(datamodel.carried_patients(parsed))


def _variants() -> list[str]:
    bodies = [fixture(p.stem) for p in sorted(FIXTURES.glob("*.json"))]
    visits = json.loads(fixture("patientadmin_visitqueryresponse"))
    numbers = copy.deepcopy(visits)
    # Integers and booleans where strings are read: polars prints them as JSON does.
    numbers["Patients"][0]["Identifiers"][0]["ID"] = 1234
    numbers["Patients"][0]["Demographics"]["SSN"] = True
    numbers["Patients"][0]["Demographics"]["ZIP"] = -7
    floats = copy.deepcopy(visits)
    floats["Patients"][0]["Identifiers"][0]["ID"] = 1e3
    shape = copy.deepcopy(visits)
    shape["Patients"][0]["Demographics"] = ["not", "an", "object"]
    return [*bodies, *(json.dumps(v) for v in (numbers, floats, shape)), "[1, 2]", '"text"']


def test_carried_patients_equal_the_decode_or_are_left_to_it() -> None:
    bodies = _variants()
    parsed = [common.load_json(b)[0] for b in bodies]
    carried = datamodel.carried_patients(parsed)
    decoded = locate.decode(pages(*bodies), "patients").select("_b").collect().to_series()
    # Left to the decode: Clinical Summary pages (EmailAddresses as objects, which repair rewrites),
    # the float, the wrong shape and the two pages that are not objects.
    assert carried.null_count() == 8
    assert carried.tail(5).null_count() == 4
    for i, value in enumerate(carried.to_list()):
        if value is not None:
            assert value == decoded[i], i


def test_patients_from_carried_pages_are_the_patients_from_decoded_pages() -> None:
    bodies = _variants()
    before = common.DECODED_PAGES["normalize"]
    from_carried = datamodel.patients(_carried_pages(*bodies)).collect()
    # Only the pages that carry nothing are decoded.
    assert common.DECODED_PAGES["normalize"] - before == 8
    assert _same_rows(from_carried, datamodel.patients(pages(*bodies)).collect())


@pytest.mark.parametrize("entity", ENTITIES)
def test_normalize_counted_decodes_once_and_matches_the_normalizer(entity: str) -> None:
    bodies = _variants()
    before = common.DECODED_PAGES["normalize"]
    normalized, counted = pl.collect_all(datamodel.normalize_counted(pages(*bodies), entity))
    assert common.DECODED_PAGES["normalize"] - before == len(bodies)
    assert _same_rows(normalized, getattr(datamodel, entity)(pages(*bodies)).collect())
    assert counted.equals(datamodel.count_records(pages(*bodies), entity).collect())
