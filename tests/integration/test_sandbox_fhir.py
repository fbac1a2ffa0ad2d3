"""The FHIR surface over real HTTP: search rules, paging under change, filters, R4B validity."""

import base64
import itertools
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fhir.resources.R4B import get_fhir_model_class

from sandbox.server import Running, serve_in_thread
from sandbox.store import Bounds

pytestmark = pytest.mark.integration

RESOURCES = {
    "Patient": "patients",
    "Encounter": "encounters",
    "Observation": "results",
    "Appointment": "appointments",
}
Bearer = Callable[[Running], dict[str, str]]


@pytest.fixture(scope="module")
def client(sandbox: Running, bearer: Bearer) -> httpx.Client:
    with httpx.Client(base_url=sandbox.credentials["fhir_base"], headers=bearer(sandbox), timeout=30) as c:
        yield c  # type: ignore[misc]


def _all_pages(
    client: httpx.Client, resource: str, data: dict[str, Any], between: Callable[[], None] | None = None
) -> list[dict[str, Any]]:
    response = client.post(f"/{resource}/_search", data=data)
    assert response.status_code == 200, response.text
    bundle = response.json()
    entries = list(bundle.get("entry", []))
    while True:
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not nxt:
            return entries
        if between:
            between()
        response = client.get(nxt[0])
        assert response.status_code == 200, response.text
        bundle = response.json()
        entries.extend(bundle.get("entry", []))


def _ids(entries: list[dict[str, Any]]) -> list[str]:
    return [e["resource"]["id"] for e in entries]


def _patients(sandbox: Running) -> list[Any]:
    return [v.record for v in sandbox.world.store.query("patients", "fhir")]


# -- Patient search rule ------------------------------------------------------------------------


def test_patient_search_requires_id_identifier_or_demographics(
    sandbox: Running, client: httpx.Client
) -> None:
    for data in ({}, {"family": "x"}, {"given": "a", "family": "b"}, {"gender": "female"}):
        response = client.post("/Patient/_search", data=data)
        assert response.status_code == 400, data
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert "requires" in outcome["issue"][0]["diagnostics"]
    patient = next(p for p in _patients(sandbox) if p.given_name and p.family_name and p.birth_date)
    identifier = patient.identifiers[0]
    for data in (
        {"_id": patient.source_id},
        {"identifier": f"{identifier.system}|{identifier.value}"},
        {
            "given": patient.given_name,
            "family": patient.family_name,
            "birthdate": patient.birth_date.isoformat(),
        },
    ):
        response = client.post("/Patient/_search", data=data)
        assert response.status_code == 200
        assert patient.source_id in _ids(response.json().get("entry", [])), data


def test_patient_search_by_ssn_and_id_list(sandbox: Running, client: httpx.Client) -> None:
    with_ssn = [p for p in _patients(sandbox) if p.ssn][:3]
    assert with_ssn
    found = client.post(
        "/Patient/_search", data={"identifier": f"http://hl7.org/fhir/sid/us-ssn|{with_ssn[0].ssn}"}
    )
    assert with_ssn[0].source_id in _ids(found.json()["entry"])
    ids = [p.source_id for p in with_ssn]
    several = client.post("/Patient/_search", data={"_id": ",".join(ids)})
    assert sorted(_ids(several.json()["entry"])) == sorted(ids)


def test_unknown_parameter_and_modifier_are_named(client: httpx.Client) -> None:
    response = client.post("/Encounter/_search", data={"patient": "x", "bogus": "1"})
    assert response.status_code == 400
    assert "bogus" in response.json()["issue"][0]["diagnostics"]
    response = client.post("/Patient/_search", data={"family:exact": "x", "_id": "y"})
    assert response.status_code == 400
    assert "exact" in response.json()["issue"][0]["diagnostics"]
    response = client.post("/Encounter/_search", data={"date": "ne2026-01-01"})
    assert response.status_code == 400
    response = client.post("/Encounter/_search", data={"date": "yesterday"})
    assert response.status_code == 400


def test_read_by_id_and_not_found(sandbox: Running, client: httpx.Client) -> None:
    store = sandbox.world.store
    for resource, kind in RESOURCES.items():
        version = store.query(kind, "fhir", limit=1)[0]
        response = client.get(f"/{resource}/{version.record.source_id}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/fhir+json")
        body = response.json()
        assert body["resourceType"] == resource
        assert body["id"] == version.record.source_id
        assert body["meta"]["versionId"] == str(version.version_id)
        assert client.get(f"/{resource}/does-not-exist").status_code == 404
    assert client.get("/Condition/x").status_code == 404


def test_wrong_org_or_environment_is_404(sandbox: Running, bearer: Bearer) -> None:
    base = sandbox.base_url
    headers = bearer(sandbox)
    assert (
        httpx.post(f"{base}/fhir/R4/other-org/Development/Encounter/_search", headers=headers).status_code
        == 404
    )
    assert (
        httpx.post(
            f"{base}/fhir/R4/redox-fhir-sandbox/Staging/Encounter/_search", headers=headers
        ).status_code
        == 404
    )


# -- search forms -------------------------------------------------------------------------------


def test_get_post_and_json_searches_agree(sandbox: Running, client: httpx.Client) -> None:
    pid = _patients(sandbox)[0].source_id
    post = client.post("/Encounter/_search", data={"patient": pid})
    get = client.get("/Encounter", params={"patient": f"Patient/{pid}"})
    get_search = client.get("/Encounter/_search", params={"patient": pid})
    as_json = client.post("/Encounter/_search", json={"patient": [pid]})
    expected = _ids(post.json().get("entry", []))
    for other in (get, get_search, as_json):
        assert other.status_code == 200
        assert _ids(other.json().get("entry", [])) == expected


def test_patient_comma_means_or(sandbox: Running, client: httpx.Client) -> None:
    store = sandbox.world.store
    a, b = (p.source_id for p in _patients(sandbox)[:2])
    expected = {v.record.source_id for v in store.query("encounters", "fhir", patient_ids={a, b})}
    entries = _all_pages(client, "Encounter", {"patient": f"Patient/{a},{b}", "_count": "5"})
    assert set(_ids(entries)) == expected
    assert len(entries) == len(expected)


def test_count_default_max_and_zero(client: httpx.Client) -> None:
    default = client.post("/Observation/_search", data={}).json()
    assert len(default["entry"]) == min(50, default["total"])
    huge = client.post("/Observation/_search", data={"_count": "5000"}).json()
    assert len(huge["entry"]) == min(1000, huge["total"])
    zero = client.post("/Observation/_search", data={"_count": "0"}).json()
    assert "entry" not in zero and zero["total"] == default["total"]
    assert client.post("/Observation/_search", data={"_count": "many"}).status_code == 400


def test_date_and_last_updated_filters_match_the_store(sandbox: Running, client: httpx.Client) -> None:
    store = sandbox.world.store
    versions = store.query("encounters", "fhir")
    starts = sorted(v.record.start_at for v in versions)
    lo, hi = starts[len(starts) // 4], starts[len(starts) // 2]
    expected = {
        v.record.source_id for v in store.query("encounters", "fhir", when=Bounds(lo, True, hi, False))
    }
    entries = _all_pages(
        client, "Encounter", {"date": [f"ge{lo.isoformat()}", f"lt{hi.isoformat()}"], "_count": "100"}
    )
    assert set(_ids(entries)) == expected and len(entries) == len(expected)

    stamps = sorted(v.last_updated for v in store.query("results", "fhir"))
    cut = stamps[len(stamps) // 2]
    expected = {v.record.source_id for v in store.query("results", "fhir", updated=Bounds(cut, False))}
    entries = _all_pages(client, "Observation", {"_lastUpdated": f"gt{cut.isoformat()}", "_count": "200"})
    assert set(_ids(entries)) == expected


def test_date_only_values_are_days_in_the_ehr_zone(sandbox: Running, client: httpx.Client) -> None:
    version = sandbox.world.store.query("appointments", "fhir", limit=1)[0]
    served = client.get(f"/Appointment/{version.record.source_id}").json()
    local_day = served["start"][:10]
    entries = _all_pages(client, "Appointment", {"date": local_day, "_count": "200"})
    assert version.record.source_id in _ids(entries)
    assert all(e["resource"]["start"][:10] == local_day for e in entries)


# -- paging -------------------------------------------------------------------------------------


def test_every_record_exactly_once_while_the_world_changes(bearer: Bearer) -> None:
    with serve_in_thread(patients=60, seed=11, rate_limit=None) as running:
        store = running.world.store
        snapshot = {v.record.source_id: v.version_id for v in store.query("results", "fhir")}

        def advance() -> None:
            httpx.post(f"{running.base_url}/sandbox/advance", json={"days": 2}).raise_for_status()

        creds = running.credentials
        with httpx.Client(base_url=creds["fhir_base"], headers=bearer(running)) as client:
            entries = _all_pages(client, "Observation", {"_count": "23"}, between=advance)
        head = {v.record.source_id: v.version_id for v in store.query("results", "fhir")}
        # The world really changed under the pages: new records appeared, old ones got new versions.
        assert set(head) - set(snapshot), "advance created no new results; the test proves nothing"
        ids = _ids(entries)
        assert len(ids) == len(set(ids)), "a record was repeated across pages"
        assert set(ids) == set(snapshot), "a record was skipped or a new one leaked into the snapshot"
        served = {e["resource"]["id"]: int(e["resource"]["meta"]["versionId"]) for e in entries}
        assert served == snapshot, "a page showed a version newer than the search's snapshot"


def test_links_carry_no_phi(sandbox: Running, client: httpx.Client) -> None:
    patient = next(p for p in _patients(sandbox) if p.family_name and p.given_name and p.birth_date)
    data = {
        "given": patient.given_name,
        "family": patient.family_name,
        "birthdate": patient.birth_date.isoformat(),
    }
    assert client.post("/Patient/_search", data=data).status_code == 200
    bundle = client.post("/Encounter/_search", data={"patient": patient.source_id, "_count": "1"}).json()
    for link in bundle["link"]:
        url = link["url"]
        assert url.startswith(sandbox.credentials["fhir_base"] + "/Encounter/_search")
        assert patient.source_id not in url
        cursor = re.search(r"_cursor=([^&]+)", url)
        if cursor:
            raw = base64.urlsafe_b64decode(cursor.group(1) + "==")
            assert patient.source_id.encode() not in raw and b"patient" not in raw


def test_tampered_cursor_is_refused(client: httpx.Client) -> None:
    bundle = client.post("/Observation/_search", data={"_count": "2"}).json()
    nxt = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    tampered = nxt[:-3] + ("AAA" if not nxt.endswith("AAA") else "BBB")
    response = client.get(tampered)
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


# -- validity -----------------------------------------------------------------------------------


def test_served_resources_validate_against_r4b(sandbox: Running, client: httpx.Client) -> None:
    checked = 0
    for resource in RESOURCES:
        data = (
            {"_count": "120"}
            if resource != "Patient"
            else {"_id": ",".join(p.source_id for p in _patients(sandbox)[:120])}
        )
        response = client.post(f"/{resource}/_search", data=data)
        bundle = response.json()
        get_fhir_model_class("Bundle").model_validate(bundle)
        for entry in bundle["entry"]:
            get_fhir_model_class(resource).model_validate(entry["resource"])
            checked += 1
    assert checked >= 300


def test_timestamps_use_the_ehr_offset(sandbox: Running, client: httpx.Client) -> None:
    bundle = client.post("/Encounter/_search", data={"_count": "20"}).json()
    offset = re.compile(r"[+-]\d{2}:\d{2}$")
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert offset.search(resource["meta"]["lastUpdated"])
        assert resource["period"]["start"][-6:] in ("-04:00", "-05:00")


def test_observation_shape(client: httpx.Client) -> None:
    bundle = client.post("/Observation/_search", data={"_count": "200"}).json()
    observations = [e["resource"] for e in bundle["entry"]]
    assert all(o["basedOn"][0]["reference"].startswith("ServiceRequest/") for o in observations)
    assert all(o["category"][0]["coding"][0]["code"] == "laboratory" for o in observations)
    assert any("valueQuantity" in o for o in observations)
    assert all(o["subject"]["reference"].startswith("Patient/") for o in observations)
    codes = {c["code"] for o in observations for i in o.get("interpretation", []) for c in i["coding"]}
    assert codes <= {"N", "L", "H", "LL", "HH", "A", "IND"}


def test_status_and_code_filters(sandbox: Running, client: httpx.Client) -> None:
    versions = sandbox.world.store.query("results", "fhir")
    code = versions[0].record.code
    expected = {v.record.source_id for v in versions if v.record.code == code}
    entries = _all_pages(client, "Observation", {"code": f"http://loinc.org|{code}", "_count": "500"})
    assert set(_ids(entries)) == expected
    statuses = {
        e["resource"]["status"]
        for e in _all_pages(client, "Appointment", {"status": "cancelled,noshow", "_count": "500"})
    }
    assert statuses <= {"cancelled", "noshow"}


def test_pages_are_contiguous(client: httpx.Client) -> None:
    pages = []
    bundle = client.post("/Appointment/_search", data={"_count": "17"}).json()
    total = bundle["total"]
    for _ in itertools.count():
        pages.append(_ids(bundle.get("entry", [])))
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not nxt:
            break
        bundle = client.get(nxt[0]).json()
        assert bundle["total"] == total
    flat = [i for page in pages for i in page]
    assert flat == sorted(flat) and len(flat) == total
    assert all(len(page) == 17 for page in pages[:-1])
