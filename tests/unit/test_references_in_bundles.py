"""References that point inside a Bundle (``urn:uuid`` fullUrls, ``contained`` ``#id``, conditional
``Patient?identifier=``) reach the patient and provider columns, through the captured-file reader
and the FHIR normalizer; what cannot be resolved is quarantined (a patient) or counted (the rest),
never a silent null."""

import json
from typing import Any

import polars as pl

from transforms import captured, fhir, fhir_refs

NPI = "http://hl7.org/fhir/sid/us-npi"

PATIENT = {
    "resourceType": "Patient",
    "id": "pat-1",
    "identifier": [{"system": "urn:oid:1.2.3.4", "value": "MRN-7"}],
    "birthDate": "1970-01-01",
}
# A practitioner a transaction Bundle creates: no id yet, named by its NPI.
DOCTOR = {
    "resourceType": "Practitioner",
    "identifier": [{"system": "urn:local", "value": "L-1"}, {"system": NPI, "value": "1234567893"}],
    "name": [{"family": "Osler", "given": ["William"]}],
}
STAMP = {"lastUpdated": "2024-03-10T08:00:00Z"}


def _encounter(eid: str, subject: str, actor: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "meta": STAMP,
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": subject},
        "participant": [
            {
                "type": [{"coding": [{"code": "PPRF"}]}],
                "individual": {"reference": actor},
            }
        ],
        "period": {"start": "2024-03-10T08:00:00Z"},
        **extra,
    }


def _observation(oid: str, subject: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "meta": STAMP,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": subject},
        "effectiveDateTime": "2024-03-10T08:00:00Z",
        "valueQuantity": {"value": 61, "unit": "/min"},
    }


def _transaction(*entries: tuple[str, dict[str, Any]]) -> str:
    return json.dumps(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"fullUrl": url, "resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
                for url, r in entries
            ],
        }
    )


def _pages(text: str, table: str) -> pl.LazyFrame:
    bodies = captured.read(text).pages[("fhir", table)]
    return pl.LazyFrame({"raw_ref": [f"p{i}" for i in range(len(bodies))], "body": bodies})


def _accounted(pages: pl.LazyFrame, out: pl.DataFrame, table: str) -> None:
    records = fhir.count_entries(pages, table).collect()["records"][0]
    parents = out.filter(pl.col("parent_source_id").is_null()) if table == "results" else out
    assert records == parents.height + parents["duplicates"].fill_null(0).sum()


def test_urn_uuid_references_resolve_to_the_entries_of_the_bundle() -> None:
    text = _transaction(
        ("urn:uuid:aaa", PATIENT),
        ("urn:uuid:ddd", DOCTOR),
        ("urn:uuid:e1", _encounter("enc-1", "urn:uuid:aaa", "urn:uuid:ddd")),
        ("urn:uuid:o1", _observation("obs-1", "urn:uuid:aaa")),
    )
    encounters = _pages(text, "encounters")
    enc = fhir.encounters(encounters).collect()
    row = enc.row(0, named=True)
    assert row["quarantine_reason"] is None
    assert row["patient_source_id"] == "pat-1"
    # No id to point at: the practitioner is named by its NPI (preferred over a local identifier).
    assert row["attending_provider_id"] == "1234567893"
    assert row["attending_provider_name"] == "William Osler"
    _accounted(encounters, enc, "encounters")
    assert fhir_refs.count_unresolved(encounters, "Encounter") == 0

    results = fhir.results(_pages(text, "results")).collect()
    assert results.select("source_id", "patient_source_id", "quarantine_reason").rows() == [
        ("obs-1", "pat-1", None)
    ]


def test_contained_practitioner_is_read_by_its_identifier() -> None:
    contained = {**DOCTOR, "id": "dr"}
    page = json.dumps(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": _encounter("enc-2", "Patient/pat-1", "#dr", contained=[contained])}],
        }
    )
    pages = pl.LazyFrame({"raw_ref": ["p"], "body": [page]})
    row = fhir.encounters(pages).collect().row(0, named=True)
    assert row["patient_source_id"] == "pat-1"
    # The contained resource's local id means nothing outside its container: the NPI is the id.
    assert row["attending_provider_id"] == "1234567893"
    assert row["attending_provider_name"] == "William Osler"


def test_conditional_patient_reference_resolves_to_the_patient_in_the_bundle() -> None:
    text = json.dumps(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"resource": PATIENT},
                {"resource": _observation("obs-2", "Patient?identifier=urn:oid:1.2.3.4|MRN-7")},
                {"resource": _observation("obs-3", "Patient?identifier=MRN-7")},
            ],
        }
    )
    out = fhir.results(_pages(text, "results")).collect().sort("source_id")
    assert out.select("source_id", "patient_source_id").rows() == [("obs-2", "pat-1"), ("obs-3", "pat-1")]


def test_what_cannot_be_resolved_is_quarantined_or_counted_and_raw_stays_as_sent() -> None:
    text = _transaction(
        ("urn:uuid:aaa", PATIENT),
        ("urn:uuid:o4", _observation("obs-4", "urn:uuid:not-in-bundle")),
        ("urn:uuid:o5", _observation("obs-5", "Patient?identifier=urn:oid:9|nobody")),
        ("urn:uuid:e3", _encounter("enc-3", "urn:uuid:aaa", "#no-such-contained")),
    )
    results_pages = _pages(text, "results")
    results = fhir.results(results_pages).collect().sort("source_id")
    assert results["quarantine_reason"].to_list() == ["subject: Patient reference not resolved"] * 2
    # The quarantined record keeps the reference exactly as the source sent it.
    assert "urn:uuid:not-in-bundle" in results["raw"][0]
    _accounted(results_pages, results, "results")

    encounter_pages = _pages(text, "encounters")
    enc = fhir.encounters(encounter_pages).collect().row(0, named=True)
    assert enc["patient_source_id"] == "pat-1" and enc["quarantine_reason"] is None
    assert enc["attending_provider_id"] is None
    # The provider left null is counted, not silent.
    assert fhir_refs.count_unresolved(encounter_pages, "Encounter") == 1
    assert fhir_refs.count_unresolved(results_pages, "Observation") == 2


def test_a_missing_subject_is_still_told_apart_from_an_unresolved_one() -> None:
    obs = _observation("obs-6", "Patient/x")
    del obs["subject"]
    page = json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": obs}]})
    out = fhir.results(pl.LazyFrame({"raw_ref": ["p"], "body": [page]})).collect()
    assert out["quarantine_reason"].to_list() == ["subject: missing Patient reference"]


def test_only_referenced_entries_ride_along_on_a_tables_page() -> None:
    text = _transaction(
        ("urn:uuid:aaa", PATIENT),
        ("urn:uuid:ddd", DOCTOR),
        ("urn:uuid:o1", _observation("obs-1", "urn:uuid:aaa")),
    )
    (body,) = captured.read(text).pages[("fhir", "results")]
    kinds = [e["resource"]["resourceType"] for e in json.loads(body)["entry"]]
    assert kinds == ["Observation", "Patient"]
    counted = fhir.count_entries(pl.LazyFrame({"body": [body]}), "results").collect().row(0, named=True)
    assert (counted["records"], counted["skipped"]) == (1, 1)
