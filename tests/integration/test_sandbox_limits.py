"""Rate limiting, injected faults and admin endpoints, each on its own small sandbox."""

import io
import itertools
import json
import os
import stat
import time
import zipfile
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

import httpx
import polars as pl
import pytest
from cryptography.hazmat.primitives import serialization
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from sandbox.datamodel_render import wire_id
from sandbox.server import Running, serve_in_subprocess, serve_in_thread

pytestmark = pytest.mark.integration

Bearer = Callable[[Running], dict[str, str]]


def _search(
    running: Running, headers: dict[str, str], resource: str = "Encounter", **data: str
) -> httpx.Response:
    return httpx.post(
        f"{running.credentials['fhir_base']}/{resource}/_search", data=data, headers=headers, timeout=30
    )


# -- rate limit ---------------------------------------------------------------------------------


def test_429_at_the_limit_with_header_and_no_retry_after(bearer: Bearer) -> None:
    with serve_in_thread(patients=10, rate_limit=(20, 5.0)) as running:
        headers = bearer(running)  # the token request is request 1 of 20
        statuses = [_search(running, headers, _count="1").status_code for _ in range(25)]
        assert statuses[:19] == [200] * 19
        assert statuses[19:] == [429] * 6
        refused = _search(running, headers)
        assert refused.status_code == 429
        assert refused.headers["X-RateLimit-Limit"] == "20"
        assert "Retry-After" not in refused.headers
        assert refused.json()["resourceType"] == "OperationOutcome"
        # Admin endpoints are outside the limit.
        stats = httpx.get(f"{running.base_url}/sandbox/stats").json()
        assert stats["responses_429"] == 7
        assert stats["rate_limit"]["refused"] == 7
        assert stats["rate_limit"]["peak_in_window"]["127.0.0.1"] == 20
        by_endpoint = stats["requests"]["by_endpoint"]
        assert by_endpoint["POST /fhir/R4/{org}/{environment}/Encounter/_search"] == {"200": 19, "429": 7}
        assert by_endpoint["POST /v2/auth/token"] == {"200": 1}


def test_window_rolls_and_retry_after_flag(bearer: Bearer) -> None:
    # A window long enough that a loaded machine still sends seven requests inside it.
    with serve_in_thread(patients=10, rate_limit=(5, 5.0), retry_after=True) as running:
        headers = bearer(running)
        codes = [_search(running, headers).status_code for _ in range(6)]
        assert codes[-1] == 429 and codes[:4] == [200] * 4
        refused = _search(running, headers)
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 5
        time.sleep(5.1)
        assert _search(running, headers).status_code == 200
        dm = httpx.post(running.credentials["datamodel_url"], json={}, headers=headers)
        for _ in range(5):
            dm = httpx.post(running.credentials["datamodel_url"], json={}, headers=headers)
        assert dm.status_code == 429 and "Errors" in dm.json()["Meta"]


# -- faults -------------------------------------------------------------------------------------


def test_5xx_and_auth_is_spared(bearer: Bearer) -> None:
    with serve_in_thread(patients=10, rate_limit=None, faults="5xx=1.0,seed=3") as running:
        headers = bearer(running)  # auth never fails on purpose
        statuses = {_search(running, headers).status_code for _ in range(30)}
        assert statuses <= {500, 502, 504} and len(statuses) >= 2
        dm = httpx.post(running.credentials["datamodel_url"], json={}, headers=headers)
        assert dm.status_code in (500, 502, 504)
        stats = httpx.get(f"{running.base_url}/sandbox/stats").json()
        assert stats["faults"]["5xx"] == 31


def test_spurious_429_timeout_and_slow(bearer: Bearer) -> None:
    with serve_in_thread(patients=10, rate_limit=None, faults="429=1.0") as running:
        response = _search(running, bearer(running))
        assert response.status_code == 429 and response.headers["X-RateLimit-Limit"] == "7500"
    with serve_in_thread(patients=10, rate_limit=None, faults="timeout=1.0:0.5s") as running:
        began = time.monotonic()
        response = _search(running, bearer(running))
        assert response.status_code == 504 and time.monotonic() - began >= 0.5
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{running.credentials['fhir_base']}/Encounter/_search", headers=bearer(running), timeout=0.2
            )
    with serve_in_thread(patients=10, rate_limit=None, faults="slow=1.0:300ms") as running:
        headers = bearer(running)
        began = time.monotonic()
        assert _search(running, headers).status_code == 200
        assert time.monotonic() - began >= 0.3


def _pages(
    running: Running, headers: dict[str, str], resource: str, count: int
) -> list[list[dict[str, Any]]]:
    pages = []
    bundle = _search(running, headers, resource, _count=str(count)).json()
    while True:
        pages.append(bundle.get("entry", []))
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not nxt:
            return pages
        bundle = httpx.get(nxt[0], headers=headers).json()


def test_dup_repeats_a_record_on_consecutive_pages(bearer: Bearer) -> None:
    with serve_in_thread(patients=20, rate_limit=None, faults="dup=1.0") as running:
        headers = bearer(running)
        pages = _pages(running, headers, "Observation", 10)
        assert len(pages) > 2
        for before, after in itertools.pairwise(pages):
            assert before[-1]["resource"]["id"] == after[0]["resource"]["id"]
        stats = httpx.get(f"{running.base_url}/sandbox/stats").json()
        assert stats["faults"]["dup"] == len(pages) - 1


def test_malformed_breaks_exactly_one_record_per_page(bearer: Bearer) -> None:
    with serve_in_thread(patients=20, rate_limit=None, faults="malformed=1.0") as running:
        headers = bearer(running)
        for resource in ("Patient", "Encounter", "Observation", "Appointment"):
            if resource == "Patient":
                ids = [v.record.source_id for v in running.world.store.query("patients", "fhir")][:15]
                pages = [_search(running, headers, "Patient", _id=",".join(ids)).json()["entry"]]
            else:
                pages = _pages(running, headers, resource, 15)[:3]
            invalid = []
            for page in pages:
                before = len(invalid)
                for entry in page:
                    try:
                        get_fhir_model_class(resource).model_validate(entry["resource"])
                    except (ValidationError, ValueError, KeyError):
                        invalid.append(entry["fullUrl"].rsplit("/", 1)[-1])
                assert len(invalid) - before == 1, (resource, len(invalid) - before)
            named = httpx.get(f"{running.base_url}/sandbox/stats").json()["malformed"]
            assert set(invalid) <= {m["source_id"] for m in named if m["resource"] == resource}
        start = "2000-01-01T00:00:00.000Z"
        dm = httpx.post(
            running.credentials["datamodel_url"],
            json={
                "Meta": {"DataModel": "Scheduling", "EventType": "Booked"},
                "StartDateTime": start,
                "EndDateTime": "2100-01-01T00:00:00.000Z",
            },
            headers=headers,
        ).json()
        from redox.scheduling import BookedResponse

        named = httpx.get(f"{running.base_url}/sandbox/stats").json()["malformed"][-1]
        assert named["surface"] == "datamodel" and named["resource"] == "Booking"
        if named["mode"] == "bad-date":
            # The redox models type VisitDateTime as a plain string, so only parsing it shows the break.
            (visit,) = [v for v in dm["Visits"] if v.get("VisitNumber") == wire_id(named["source_id"])]
            with pytest.raises(ValueError):
                datetime.fromisoformat(visit["VisitDateTime"])
        else:
            with pytest.raises(ValidationError):
                BookedResponse.model_validate(dm)
        served = {v["VisitNumber"] for v in dm["Visits"] if "VisitNumber" in v}
        expected = {v.record.source_id for v in running.world.store.query("appointments", "datamodel")}
        # A missing-required break removes the id from the wire; the sandbox still names the record.
        assert named["source_id"] in expected and (named["mode"] == "missing-required") != (
            wire_id(named["source_id"]) in served
        )


def test_a_broken_record_under_a_reused_id_is_named_by_its_own_id(bearer: Bearer) -> None:
    """The sandbox sends a few Data Model order ids for two patients' orders. When one of them is
    served broken, the stats name that patient's record, not every record sent under the id: else a
    test cannot tell the broken record from an intact one the pipeline lost (a chaos run once did)."""
    first, last = date(2026, 11, 27), date(2026, 12, 1)
    with serve_in_thread(
        patients=120, seed=11, start=first, end=last, rate_limit=None, faults="malformed=1.0"
    ) as running:
        results = running.world.truth()["results"].filter(pl.col("source_surface") == "datamodel")
        reused = results.filter(pl.col("source_id").str.contains("~"))
        assert not reused.is_empty(), "this world no longer reuses an order id: pick another seed"
        patient = reused["patient_source_id"][0]
        own = set(results.filter(pl.col("patient_source_id") == patient)["source_id"])
        headers = bearer(running)
        body = {
            "Meta": {"DataModel": "Results", "EventType": "Query"},
            "Patients": [{"Identifiers": [{"ID": patient, "IDType": "MR"}]}],
        }
        # Each reply breaks one of the patient's orders at random: ask until the reused one broke.
        for _ in range(60):
            reply = httpx.post(running.credentials["datamodel_url"], json=body, headers=headers, timeout=30)
            assert reply.status_code == 200, reply.status_code
            named = {
                m["source_id"] for m in httpx.get(f"{running.base_url}/sandbox/stats").json()["malformed"]
            }
            assert named <= own, "a broken record was named by an id that is not this patient's"
            if named & set(reused.filter(pl.col("patient_source_id") == patient)["source_id"]):
                break
        else:
            pytest.fail("the order under the reused id never broke in 60 replies")


# -- admin --------------------------------------------------------------------------------------


def test_stats_reset_truth_and_credentials_file(sandbox: Running) -> None:
    mode = stat.S_IMODE(os.stat(sandbox.credentials_path).st_mode)
    assert mode == 0o600
    on_disk = json.loads(sandbox.credentials_path.read_text())
    assert on_disk["fhir_base"] == f"{sandbox.base_url}/fhir/R4/redox-fhir-sandbox/Development"
    assert on_disk["token_url"] == f"{sandbox.base_url}/v2/auth/token"
    assert serialization.load_pem_private_key(on_disk["private_key_pem"].encode(), password=None)
    response = httpx.get(f"{sandbox.base_url}/sandbox/truth", timeout=60)
    assert response.status_code == 200
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        names = archive.namelist()
        assert "persons.parquet" in names
        persons = pl.read_parquet(io.BytesIO(archive.read("persons.parquet")))
    assert persons.height > 0
    assert httpx.get(f"{sandbox.base_url}/sandbox/health").json() == {"status": "ok"}


def test_advance_and_stats_reset(bearer: Bearer) -> None:
    with serve_in_thread(patients=20, rate_limit=None) as running:
        base = running.base_url
        before = httpx.get(f"{base}/sandbox/stats").json()
        advanced = httpx.post(f"{base}/sandbox/advance", json={"days": 2}).json()
        assert advanced["head_seq"] >= before["head_seq"]
        assert advanced["clock"] > before["clock"]
        assert httpx.post(f"{base}/sandbox/advance", json={"days": 0}).status_code == 400
        assert httpx.post(f"{base}/sandbox/advance", content=b"nope").status_code == 400
        _search(running, bearer(running))
        assert httpx.get(f"{base}/sandbox/stats").json()["requests"]["total"] == 2
        reset = httpx.post(f"{base}/sandbox/stats/reset").json()
        assert reset["requests"]["total"] == 0 and reset["rate_limit"]["peak_in_window"] == {}


def test_subprocess_server_and_cli(tmp_path: Any, bearer: Bearer) -> None:
    with serve_in_subprocess(patients=15, rate_limit=None, state_dir=tmp_path) as running:
        assert running.credentials_path == tmp_path / "credentials.json"
        assert stat.S_IMODE(os.stat(running.credentials_path).st_mode) == 0o600
        assert _search(running, bearer(running)).status_code == 200
        out = tmp_path / "truth"
        from typer.testing import CliRunner

        from sandbox.cli import app

        result = CliRunner().invoke(app, ["truth", "--out", str(out), "--url", running.base_url])
        assert result.exit_code == 0, result.output
        assert (out / "persons.parquet").exists()
    assert running.process is not None and running.process.poll() is not None


def test_fault_spec_parsing() -> None:
    from sandbox.faults import FaultSpec

    spec = FaultSpec.parse(
        "5xx=0.03,timeout=0.01:30s,429=0.01,dup=0.01,malformed=0.002,slow=0.05:500ms,seed=9"
    )
    assert (spec.server_error, spec.timeout, spec.timeout_seconds, spec.too_many) == (0.03, 0.01, 30.0, 0.01)
    assert (spec.dup, spec.malformed, spec.slow, spec.slow_seconds, spec.seed) == (0.01, 0.002, 0.05, 0.5, 9)
    assert not FaultSpec.parse(None).active and not FaultSpec.parse("off").active
    for bad in ("nonsense=0.1", "5xx", "5xx=2", "dup=0.1:2s", "5xx=0.6,429=0.6", "slow=0.1:fast"):
        with pytest.raises(ValueError):
            FaultSpec.parse(bad)
