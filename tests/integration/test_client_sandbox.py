"""The Redox client against a real sandbox on loopback: auth lifecycles, faults, errors, both surfaces.

Nothing is mocked: the sandbox is the HTTP server. Where a test needs the server to do something a
client cannot ask for (forget a key), it uses the sandbox object of ``serve_in_thread``; where it
needs the client to misbehave (keep a token past its life), it says so.
"""

import asyncio
import json
import time
from datetime import UTC, datetime

import httpx
import polars as pl
import pytest

from resources.redox import (
    RedoxClient,
    RedoxDataModelError,
    RedoxRequestError,
    RedoxSettings,
)
from resources.redox.fhir import date_window
from resources.redox.resource import RedoxResource
from resources.redox.settings import RateSpec
from sandbox.server import serve_in_thread

pytestmark = pytest.mark.integration

WORLD = {"seed": 11, "patients": 40}
FOREVER = (datetime(1900, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC))


def _settings(running, tmp_path, **overrides) -> RedoxSettings:
    values = {
        "budget_path": tmp_path / "budget.sqlite",
        # These tests are about behaviour, not pacing: a budget far above what they send.
        "rate_limit": RateSpec(limit=100_000, seconds=60),
        "read_timeout": 5.0,
        "retry_timeout": 60.0,
    }
    values.update(overrides)
    return RedoxSettings.from_credentials(running.credentials_path, **values)


def _stats(running) -> dict:
    return httpx.get(f"{running.base_url}/sandbox/stats", timeout=10).json()


async def _encounter_ids(client: RedoxClient, **params) -> list[str]:
    ids = []
    async for page in client.fhir.search("Encounter", params={**date_window(*FOREVER), **params}):
        ids.extend(r["id"] for r in page.resources)
    return ids


@pytest.fixture(scope="module")
def plain():
    with serve_in_thread(**WORLD, rate_limit=None) as running:
        yield running


@pytest.fixture(scope="module")
def truth(plain, tmp_path_factory) -> dict[str, list[str]]:
    """Every encounter id, and a few patient ids and names, read fault-free once."""
    tmp = tmp_path_factory.mktemp("truth")

    async def read() -> dict[str, list[str]]:
        async with RedoxClient(_settings(plain, tmp)) as client:
            encounters = []
            patients = set()
            async for page in client.fhir.search(
                "Encounter", params={**date_window(*FOREVER), "_count": "50"}
            ):
                for r in page.resources:
                    encounters.append(r["id"])
                    patients.add(r["subject"]["reference"].split("/")[-1])
            names = []
            async for page in client.fhir.search("Patient", params={"_id": ",".join(sorted(patients))}):
                for r in page.resources:
                    name = (r.get("name") or [{}])[0]
                    names.extend([name.get("family", ""), *name.get("given", [])])
        return {"encounters": encounters, "patients": sorted(patients), "names": [n for n in names if n]}

    return asyncio.run(read())


async def test_token_is_refreshed_before_it_expires(tmp_path):
    with serve_in_thread(**WORLD, rate_limit=None, token_ttl=2) as running:
        async with RedoxClient(_settings(running, tmp_path)) as client:
            deadline = time.monotonic() + 5.0
            searches = 0
            while time.monotonic() < deadline:
                await _encounter_ids(client, _count="5", patient="no-such-patient")
                searches += 1
                await asyncio.sleep(0.25)
            frame = client.audit_frame()
    assert searches >= 10
    assert frame.filter(pl.col("status") == 401).height == 0  # refreshed ahead, never refused
    assert frame.filter(pl.col("surface") == "auth").height >= 3  # 5 s of 2 s tokens


async def test_401_gets_one_refresh_then_succeeds(tmp_path):
    with serve_in_thread(**WORLD, rate_limit=None, token_ttl=2) as running:
        async with RedoxClient(_settings(running, tmp_path)) as client:
            await _encounter_ids(client, patient="no-such-patient")
            # Make the client keep its token past the server's expiry, as if the server had revoked
            # it early: the next call meets a 401.
            oauth = client.authorizer("oauth")
            oauth._token.refresh_at = float("inf")  # type: ignore[union-attr]
            await asyncio.sleep(2.3)
            await _encounter_ids(client, patient="no-such-patient")
            frame = client.audit_frame()
    assert frame["status"].to_list() == [200, 200, 401, 200, 200]
    assert frame["surface"].to_list() == ["auth", "fhir", "fhir", "auth", "fhir"]
    assert frame["attempt"].to_list()[2:] == [1, 1, 2]


async def test_key_rotation_without_downtime(tmp_path):
    with serve_in_thread(**WORLD, rate_limit=None, token_ttl=2) as running:
        settings = _settings(running, tmp_path)
        first, second = settings.keys
        assert (first.alg, second.alg) == ("RS384", "ES384")
        async with RedoxClient(settings) as client:
            deadline = time.monotonic() + 4.0
            rotated = False
            while time.monotonic() < deadline:
                if not rotated and time.monotonic() > deadline - 3.0:
                    # Redox forgets the active kid (removed from the dashboard / JWKS).
                    running.sandbox.auth.unregister_key(running.credentials["client_id"], first.kid)
                    rotated = True
                await _encounter_ids(client, patient="no-such-patient")
                await asyncio.sleep(0.2)
            active = client.authorizer("oauth").active_kid  # type: ignore[union-attr]
            frame = client.audit_frame()
    assert active == second.kid
    auth = frame.filter(pl.col("surface") == "auth")["status"].to_list()
    assert auth.count(401) == 1  # one "Public key not found", then the next key for good
    assert frame.filter(pl.col("surface") == "fhir")["status"].unique().to_list() == [200]


async def test_legacy_auth_and_refresh_on_the_datamodel_surface(tmp_path, plain):
    settings = _settings(plain, tmp_path, datamodel_auth="legacy")
    start, end = FOREVER
    async with RedoxClient(settings) as client:
        first = await client.datamodel.visit_query(start=start, end=end)
        legacy = client.authorizer("legacy")
        legacy._token.refresh_at = 0.0  # type: ignore[union-attr]  # as if 80% of 24 h had passed
        second = await client.datamodel.visit_query(start=start, end=end)
        frame = client.audit_frame()
    assert first.json["Patients"] and second.json["Patients"]
    assert json.loads(first.raw) == first.json
    endpoints = frame.filter(pl.col("surface") == "auth")["endpoint"].to_list()
    assert endpoints == ["POST /auth/authenticate", "POST /auth/refreshToken"]
    assert legacy.refreshes == 1  # type: ignore[union-attr]


async def test_every_datamodel_query(tmp_path, plain, truth):
    start, end = FOREVER
    async with RedoxClient(_settings(plain, tmp_path)) as client:
        visits = await client.datamodel.visit_query(start=start, end=end)
        booked = await client.datamodel.scheduling_booked(start=start, end=end)
        results = await client.datamodel.results_query(start=start, end=end)
        identifiers = results.json["Orders"][0]["Patient"]["Identifiers"][:1]
        found = await client.datamodel.patient_search(identifiers=identifiers)
        some = await client.datamodel.results_query(start=start, end=end, patients=[identifiers])
    assert visits.json["Patients"] and booked.json["Visits"] and results.json["Orders"]
    assert found.json["Patient"]["Identifiers"]
    assert 0 < len(some.json["Orders"]) <= len(results.json["Orders"])


async def test_retries_under_faults_deliver_every_record(tmp_path, truth):
    faults = "5xx=0.08,timeout=0.03:2s,429=0.02,dup=0.05,malformed=0.01,slow=0.1:0.3s,seed=5"
    with serve_in_thread(**WORLD, rate_limit=None, faults=faults) as running:
        settings = _settings(running, tmp_path, read_timeout=1.0, max_in_flight=4)
        async with RedoxClient(settings) as client:
            received = []
            duplicates = 0
            async for page in client.fhir.search(
                "Encounter", params={**date_window(*FOREVER), "_count": "10"}
            ):
                received.extend(r["id"] for r in page.resources)
                duplicates += page.duplicates
            by_patient = []
            async for page in client.fhir.search_patients(
                "Encounter", patients=truth["patients"], params={"_count": "7"}, batch_size=6
            ):
                by_patient.extend(r["id"] for r in page.resources)
            frame = client.audit_frame()
        injected = _stats(running)["faults"]
    # Every record arrived, once per distinct id; the dup fault's repeats are flagged, not hidden.
    assert sorted(set(received)) == sorted(truth["encounters"])
    assert len(received) - duplicates == len(truth["encounters"])
    assert sorted(set(by_patient)) == sorted(truth["encounters"])
    # The faults did happen, and were retried.
    statuses = frame["status"].to_list()
    assert injected.get("5xx", 0) > 0 and any(s is not None and s >= 500 for s in statuses)
    assert None in statuses or injected.get("timeout", 0) == 0
    assert frame["attempt"].max() > 1


async def test_4xx_error_shows_server_text_and_no_patient_data(tmp_path, plain, truth):
    names = truth["names"][:2]
    patient_id = truth["patients"][0]
    async with RedoxClient(_settings(plain, tmp_path)) as client:
        with pytest.raises(RedoxRequestError) as fhir_error:
            # A Patient search needs _id, identifier or given+family+birthdate.
            async for _ in client.fhir.search("Patient", params={"given": names[1], "family": names[0]}):
                pass
        with pytest.raises(RedoxRequestError) as count_error:
            async for _ in client.fhir.search("Encounter", params={"patient": patient_id, "_count": "many"}):
                pass
        with pytest.raises(RedoxDataModelError) as dm_error:
            await client.datamodel.query(
                "Results",
                "Query",
                {"Patients": [{"Identifiers": [{"ID": patient_id}]}]} | {"Completion": "soon"},
            )
        attempts = client.audit_frame().filter(pl.col("surface") != "auth").height
    assert attempts == 3  # a 4xx is not retried
    text = str(fhir_error.value)
    assert "HTTP 400" in text and "POST /fhir/R4/{org}/{env}/Patient/_search" in text
    assert "given, family and birthdate" in text
    assert "'_count'" in str(count_error.value)
    assert "Completion" in str(dm_error.value) and dm_error.value.texts
    for error in (fhir_error.value, count_error.value, dm_error.value):
        shown = str(error) + repr(error)
        assert patient_id not in shown
        assert not any(name in shown for name in names)


async def test_resource_hands_out_a_working_client(tmp_path, plain, monkeypatch):
    monkeypatch.delenv("REDOX_BASE_URL", raising=False)
    monkeypatch.setenv("REDOX_SANDBOX_CREDENTIALS", str(plain.credentials_path))
    monkeypatch.setenv("REDOX_BUDGET_PATH", str(tmp_path / "budget.sqlite"))
    resource = RedoxResource(rate_limit="100000/60")
    async with resource.client(run_id="run-42") as client:
        ids = await _encounter_ids(client, patient="no-such-patient")
        frame = client.audit_frame()
    assert ids == []
    assert frame["run_id"].unique().to_list() == ["run-42"]
