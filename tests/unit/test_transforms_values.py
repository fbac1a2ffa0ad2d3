"""No silent loss in the normalizers: every Observation value[x], components and panel members, one
code-system vocabulary, references in every standard form, requests told from replies by content,
and keys that cannot merge two patients' records."""

import copy
import json
from datetime import UTC, datetime
from typing import Any

import polars as pl
import pytest

from tests.unit import test_transforms_datamodel as dm
from tests.unit import test_transforms_fhir as fh
from transforms import codesystems, datamodel

OBS: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "obs-1",
    "meta": {"lastUpdated": "2026-11-01T10:00:00Z"},
    "status": "final",
    "code": {"coding": [{"system": "LOINC", "code": "1234-5"}]},
    "subject": {"reference": "Patient/p1"},
    "effectiveDateTime": "2026-11-01T09:00:00Z",
}


def observation(**fields: Any) -> dict[str, Any]:
    return {**copy.deepcopy(OBS), **fields}


def one_result(**fields: Any) -> dict[str, Any]:
    out = fh.good(fh.run("results", fh.bundle(observation(**fields))))
    assert out.height == 1
    return out.row(0, named=True)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"valueQuantity": {"value": 5.5, "comparator": "<", "unit": "mg/dL"}},
            {"value_type": "quantity", "value_num": 5.5, "value_comparator": "<", "unit": "mg/dL"},
        ),
        (
            {
                "valueCodeableConcept": {
                    "coding": [
                        {
                            "system": "urn:oid:2.16.840.1.113883.6.96",
                            "code": "10828004",
                            "display": "Positive",
                        }
                    ]
                }
            },
            {
                "value_type": "codeable_concept",
                "value_code": "10828004",
                "value_code_system": codesystems.SNOMED,
                "value_code_system_source": "urn:oid:2.16.840.1.113883.6.96",
                "value_code_display": "Positive",
                "value_text": "Positive",
            },
        ),
        ({"valueBoolean": False}, {"value_type": "boolean", "value_text": "false"}),
        ({"valueInteger": 7}, {"value_type": "integer", "value_num": 7.0}),
        (
            {"valueRange": {"low": {"value": 1.0, "unit": "mg"}, "high": {"value": 2.5, "unit": "mg"}}},
            {"value_type": "range", "value_low": 1.0, "value_high": 2.5, "unit": "mg"},
        ),
        (
            {"valueRatio": {"numerator": {"value": 1.0}, "denominator": {"value": 128.0}}},
            {"value_type": "ratio", "value_num": 1.0, "value_denominator": 128.0},
        ),
        (
            {"valueDateTime": "2026-10-31T20:00:00-04:00"},
            {"value_type": "datetime", "value_at": datetime(2026, 11, 1, 0, 0, tzinfo=UTC)},
        ),
        (
            {"valuePeriod": {"start": "2026-10-01", "end": "2026-10-02"}},
            {
                "value_type": "period",
                "value_at": datetime(2026, 10, 1, tzinfo=UTC),
                "value_end_at": datetime(2026, 10, 2, tzinfo=UTC),
            },
        ),
        ({"valueTime": "08:30:00"}, {"value_type": "time", "value_text": "08:30:00"}),
        (
            {"valueSampledData": {"origin": {"value": 0, "unit": "mV"}, "data": "1 2 3"}},
            {"value_type": "sampled_data", "value_text": "1 2 3", "unit": "mV"},
        ),
        (
            {"dataAbsentReason": {"coding": [{"code": "not-performed"}]}},
            {"value_type": "absent", "absent_reason": "not-performed"},
        ),
    ],
)
def test_every_value_type_lands_in_a_column(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    row = one_result(**fields)
    assert {k: row[k] for k in expected} == expected
    # The code system is canonical; the source's spelling is kept.
    assert (row["code_system"], row["code_system_source"]) == (codesystems.LOINC, "LOINC")


BP = observation(
    id="bp-1",
    code={"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
    component=[
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "valueQuantity": {"value": 120.0, "unit": "mm[Hg]"},
            "interpretation": [{"coding": [{"code": "H"}]}],
            "referenceRange": [{"high": {"value": 119.0}}],
        },
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
            "dataAbsentReason": {"coding": [{"code": "unknown"}]},
        },
    ],
    hasMember=[{"reference": "Observation/m1"}, {"reference": "https://h/fhir/Observation/m2"}],
)


def test_components_are_rows_of_their_own_linked_to_their_parent() -> None:
    out = fh.run("results", fh.bundle(BP))
    rows = {r["source_id"]: r for r in out.iter_rows(named=True)}
    assert set(rows) == {"bp-1", "bp-1/component/0", "bp-1/component/1"}
    parent, systolic, diastolic = rows["bp-1"], rows["bp-1/component/0"], rows["bp-1/component/1"]
    assert parent["member_source_ids"] == ["m1", "m2"] and parent["parent_source_id"] is None
    assert (systolic["parent_source_id"], systolic["code"], systolic["value_num"], systolic["unit"]) == (
        "bp-1",
        "8480-6",
        120.0,
        "mm[Hg]",
    )
    assert (systolic["abnormal_flag"], systolic["reference_high"]) == ("high", 119.0)
    assert (diastolic["value_type"], diastolic["absent_reason"]) == ("absent", "unknown")
    # Components take the parent's patient, status and times.
    for c in (systolic, diastolic):
        assert (c["patient_source_id"], c["status"], c["effective_at"]) == (
            "p1",
            "final",
            parent["effective_at"],
        )


def test_a_duplicate_observation_brings_its_components_once() -> None:
    newer = copy.deepcopy(BP)
    newer["meta"] = {"lastUpdated": "2026-11-02T10:00:00Z"}
    newer["component"][0]["valueQuantity"]["value"] = 130.0
    out = fh.run("results", fh.bundle(BP), fh.bundle(newer))
    assert out.height == 3 and out["duplicates"].sum() == 1
    assert out.filter(pl.col("source_id") == "bp-1/component/0")["value_num"].item() == 130.0


ENCOUNTER: dict[str, Any] = {
    "resourceType": "Encounter",
    "id": "enc-1",
    "meta": {"lastUpdated": "2026-11-01T10:00:00Z"},
    "status": "finished",
    "class": {"code": "AMB"},
    "subject": {"reference": "Patient/p1"},
    "period": {"start": "2026-11-01T09:00:00Z"},
}


def attending(*participants: dict[str, Any]) -> tuple[str | None, str | None]:
    out = fh.good(fh.run("encounters", fh.bundle({**ENCOUNTER, "participant": list(participants)})))
    row = out.row(0, named=True)
    return row["attending_provider_id"], row["attending_provider_name"]


def typed(code: str, individual: dict[str, Any]) -> dict[str, Any]:
    return {"type": [{"coding": [{"code": code}]}], "individual": individual}


def test_provider_references_in_every_form() -> None:
    npi = "http://hl7.org/fhir/sid/us-npi"
    conditional = {"reference": f"Practitioner?identifier={npi}|1234567893", "display": "Dr A"}
    assert attending(typed("PPRF", conditional)) == ("1234567893", "Dr A")
    assert attending(typed("ATND", {"reference": "https://h/fhir/Practitioner/9/_history/2"})) == ("9", None)
    assert attending(typed("ATND", {"identifier": {"system": npi, "value": "42"}})) == ("42", None)
    assert attending(typed("ATND", {"display": "Dr Display"})) == (None, "Dr Display")
    # A display-only participant with no provider type is not a provider (could be a relative).
    assert attending({"individual": {"display": "Someone"}}) == (None, None)


def test_participant_types_rank_attender_first_then_performers() -> None:
    part = typed("PART", {"reference": "Practitioner/part"})
    pprf = typed("PPRF", {"reference": "Practitioner/pprf"})
    atnd = typed("ATND", {"reference": "Practitioner/atnd"})
    untyped = {"individual": {"reference": "Practitioner/untyped"}}
    assert attending(untyped, part, pprf, atnd)[0] == "atnd"
    assert attending(untyped, part, pprf)[0] == "pprf"
    assert attending(untyped, part)[0] == "part"
    assert attending(untyped, {"individual": {"reference": "RelatedPerson/r"}})[0] == "untyped"


def test_code_system_spellings_reach_one_uri() -> None:
    spellings = [
        "LOINC",
        "loinc",
        "LN",
        "http://loinc.org/",
        "urn:oid:2.16.840.1.113883.6.1",
        " 2.16.840.1.113883.6.1 ",
    ]
    frame = pl.DataFrame({"s": [*spellings, "SNOMED CT", "CPT", "ICD-10", "urn:local:lab", "", None]})
    got = frame.select(codesystems.canonical(pl.col("s")).alias("s"))["s"].to_list()
    assert got == [codesystems.LOINC] * len(spellings) + [
        codesystems.SNOMED,
        codesystems.CPT,
        codesystems.ICD10CM,
        "urn:local:lab",
        None,
        None,
    ]
    assert [codesystems.canonical_value(s) for s in spellings] == [codesystems.LOINC] * len(spellings)
    counted = codesystems.unknown_counts(
        pl.DataFrame({"code_system": got, "value_code_system": [None] * len(got)}), "results"
    )
    assert counted == {"code_system": 1, "value_code_system": 0}


def test_a_patient_search_reply_echoing_query_is_read_and_a_request_is_not() -> None:
    reply = json.loads(dm.fixture("patientsearch_response"))
    reply["Meta"]["EventType"] = "Query"
    assert dm.run("patients", json.dumps(reply))["source_id"].to_list() == ["0000000001"]
    assert dm.run("patients", dm.fixture("patientsearch_query")).is_empty()


def test_two_records_with_one_id_and_two_patients_both_survive() -> None:
    other = {"Identifiers": [{"ID": "MRN2", "IDType": "MR"}]}
    # One batch, and two batches: neither the dedupe nor a later merge can fold one into the other.
    out = dm.run("results", dm.results_body(dm.order(), dm.order(Patient=other)))
    good = dm.good(out)
    assert sorted(good["source_id"]) == ["MRN1/ORD1|2345-7", "MRN2/ORD1|2345-7"]
    assert out["duplicates"].sum() == 0
    visits = dm.run(
        "encounters",
        dm.visits_body(dm.VISIT),
        dm.visits_body(dm.VISIT, patient={**other, "Demographics": {"FirstName": "B"}}),
    )
    assert sorted(dm.good(visits)["source_id"]) == ["MRN1/V1", "MRN2/V1"]
    # The same record sent twice for one patient is still one row.
    again = dm.run("results", dm.results_body(dm.order(), dm.order()))
    assert dm.good(again).height == 1 and again["duplicates"].sum() == 1


def test_datamodel_value_types_map_to_the_same_columns() -> None:
    def result(value: str | None, value_type: str | None) -> dict[str, Any]:
        body = dm.results_body(
            dm.order(Results=[{**dm.order()["Results"][0], "Value": value, "ValueType": value_type}])
        )
        return datamodel.results(dm.pages(body)).collect().row(0, named=True)

    assert {k: result(">10", "Numeric")[k] for k in ("value_type", "value_num", "value_comparator")} == {
        "value_type": "quantity",
        "value_num": 10.0,
        "value_comparator": ">",
    }
    coded = result("Positive", "Coded Entry")
    assert (coded["value_type"], coded["value_code"], coded["value_text"]) == (
        "codeable_concept",
        "Positive",
        "Positive",
    )
    when = result("2026-11-01T10:00:00.000Z", "DateTime")
    assert (when["value_type"], when["value_at"]) == ("datetime", datetime(2026, 11, 1, 10, tzinfo=UTC))
    assert result("<b>bold</b>", "FormattedText")["value_type"] == "string"
    assert result(None, "Numeric")["value_type"] is None
