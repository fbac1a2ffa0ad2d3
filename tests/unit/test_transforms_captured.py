"""Shape detection of captured payloads (transforms/captured.py) and path counting (transforms/coverage.py)."""

import json
from pathlib import Path

import polars as pl

from transforms import captured, coverage
from transforms.streams import STREAMS


def _obs(i: int) -> dict:
    return {"resourceType": "Observation", "id": f"o{i}", "valueQuantity": {"value": i}}


def test_ndjson_is_wrapped_into_pages_of_one_type() -> None:
    lines = [json.dumps(_obs(i)) for i in range(captured.PAGE_ENTRIES + 3)]
    lines.insert(2, json.dumps({"resourceType": "Patient", "id": "p"}))
    found = captured.read("\n".join(lines))
    results = [json.loads(p) for p in found.pages[("fhir", "results")]]
    assert [len(p["entry"]) for p in results] == [captured.PAGE_ENTRIES, 3]
    assert all(p["resourceType"] == "Bundle" and p["type"] == "searchset" for p in results)
    assert len(found.pages[("fhir", "patients")]) == 1
    assert found.documents == len(lines) and not found.unrouted


def test_bundles_of_every_type_route_entries_by_resource_type() -> None:
    for kind in ("searchset", "collection", "transaction", "message"):
        bundle = {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [
                {"resource": {"resourceType": "MessageHeader", "id": "h"}},
                {
                    "fullUrl": "urn:uuid:1",
                    "resource": _obs(1),
                    "request": {"method": "POST", "url": "Observation"},
                },
                {"resource": {"resourceType": "Encounter", "id": "e"}},
                {"fullUrl": "no resource"},
            ],
        }
        found = captured.read(json.dumps(bundle))
        assert set(found.pages) == {("fhir", "results"), ("fhir", "encounters")}
        entry = json.loads(found.pages[("fhir", "results")][0])["entry"][0]
        assert entry["request"]["method"] == "POST"  # kept as sent
        assert found.other == {"fhir:MessageHeader": 1}
        assert [u.reason for u in found.unrouted] == ["Bundle entry without a resource.resourceType"]


def test_datamodel_messages_and_unknown_shapes() -> None:
    results = {"Meta": {"DataModel": "Results", "EventType": "New"}, "Orders": []}
    summary = {"Meta": {"DataModel": "Clinical Summary", "EventType": "PatientPush"}}
    order = {"Meta": {"DataModel": "Order", "EventType": "New"}}
    text = "\n".join([json.dumps(results), json.dumps(summary), json.dumps(order), "{oops", "42", '{"a": 1}'])
    found = captured.read(text)
    assert len(found.pages[("datamodel", "results")]) == 2
    assert len(found.pages[("datamodel", "encounters")]) == 1
    assert found.other == {"datamodel:Order": 1}
    assert [(u.where, u.reason) for u in found.unrouted] == [
        ("line 4", "not JSON"),
        ("line 5", "not a JSON object"),
        ("line 6", "neither a FHIR resource (resourceType) nor a Data Model message (Meta.DataModel)"),
    ]


def test_coverage_counts_a_record_once_per_path_and_flags_mapped_paths() -> None:
    obs = {
        "resourceType": "Observation",
        "id": "o",
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}, {"code": "x"}]},
        "component": [{"valueQuantity": {"value": 1}}, {"valueQuantity": {"value": 2}}],
        "specimen": {"display": "serum"},
        "note": [],
        "status": "",
    }
    page = json.dumps(
        {"resourceType": "Bundle", "entry": [{"resource": obs}, {"resource": {**obs, "id": "p"}}]}
    )
    frame = coverage.field_coverage(
        pl.LazyFrame({"raw_ref": ["r"], "body": [page]}), "fhir", "results"
    ).collect()
    got = {r["path"]: (r["records"], r["mapped"]) for r in frame.iter_rows(named=True)}
    assert got == {
        "resourceType": (2, True),
        "id": (2, True),
        "code.coding[].system": (2, True),
        "code.coding[].code": (2, True),
        "component[].valueQuantity.value": (2, True),
        "specimen.display": (2, False),
    }
    assert coverage.top_unmapped(frame) == ["specimen.display (2)"]
    assert coverage.is_mapped("identifier[].value", ["identifier"])
    assert not coverage.is_mapped("identifierX", ["identifier"])


def test_every_stream_has_a_registry() -> None:
    assert set(coverage.MAPPED) == set(STREAMS)


def test_vectorized_counts_equal_the_python_walk() -> None:
    """The polars path and the Python fallback count the same, on Redox's own example messages."""
    folder = Path(__file__).resolve().parents[1] / "fixtures" / "redox-datamodel"
    bodies = pl.Series([f.read_text() for f in sorted(folder.glob("results_*.json"))])
    vectorized = coverage._counts_vectorized(bodies, "datamodel", "results")
    assert vectorized and vectorized == coverage.count_paths(bodies.to_list(), "datamodel", "results")
    page = json.dumps(
        {
            "resourceType": "Bundle",
            "entry": [{"resource": _obs(i) | {"note": [{"text": ""}]}} for i in range(3)],
        }
    )
    fhir = pl.Series([page, page])
    assert coverage._counts_vectorized(fhir, "fhir", "results") == coverage.count_paths(
        fhir.to_list(), "fhir", "results"
    )
