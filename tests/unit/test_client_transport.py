"""Transport, FHIR paging and Data Model queries against scripted responses (httpx.MockTransport).

The integration tests cover the same paths against the real sandbox; these pin down the edge cases
(error texts, redaction, retry classes, paging guards) quickly and deterministically.
"""

import json
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import jwt
import polars as pl
import pytest
import stamina
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from resources.redox import (
    PageTotalMismatch,
    RedoxAuthError,
    RedoxClient,
    RedoxConnectionError,
    RedoxDataModelError,
    RedoxRequestError,
    RedoxServerError,
)
from resources.redox.fhir import batches, date_window
from resources.redox.settings import RateSpec, RedoxSettings, SigningKey
from schema import API_CALLS

BASE = "http://redox.test"
FHIR = f"{BASE}/fhir/R4/acme/Development"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    return SigningKey.from_pem("kid-1", pem, origin="test")


@pytest.fixture(autouse=True)
def fast_retries():
    # No backoff sleeps, at most 4 attempts: the retry policy itself is stamina's, tested there.
    stamina.set_testing(True, attempts=4, cap=True)
    yield
    stamina.set_testing(False)


def _settings(tmp_path, key: SigningKey, **kw) -> RedoxSettings:
    values = dict(
        base_url=BASE,
        client_id="cid",
        keys=(key,),
        fhir_org="acme",
        budget_path=tmp_path / "budget.sqlite",
        rate_limit=RateSpec(limit=100_000, seconds=10),
        retry_attempts=4,
        destination_ids={"results": "dest-r"},
        source_id="src-1",
    )
    values.update(kw)
    return RedoxSettings(**values)


def _client(tmp_path, key, handler: Callable[[httpx.Request], httpx.Response], **kw) -> RedoxClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return RedoxClient(_settings(tmp_path, key, **kw), run_id="run-1", http=http)


def _token(request: httpx.Request) -> httpx.Response | None:
    if request.url.path == "/v2/auth/token":
        return httpx.Response(200, json={"access_token": "tok", "token_type": "Bearer", "expires_in": 300})
    return None


def _bundle(ids, *, total=None, next_url=None, mode="match") -> dict:
    body = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {
                "fullUrl": f"{FHIR}/Encounter/{i}",
                "resource": {"resourceType": "Encounter", "id": i},
                "search": {"mode": mode},
            }
            for i in ids
        ],
        "link": [{"relation": "next", "url": next_url}] if next_url else [],
    }
    if total is not None:
        body["total"] = total
    return body


async def test_paging_follows_next_links_keeps_raw_bytes_and_audits(tmp_path, key):
    pages = {
        None: _bundle(["e1", "e2"], total=5, next_url=f"{FHIR}/Encounter/_search?_cursor=A"),
        "A": _bundle(["e3", "e4"], total=5, next_url=f"{FHIR}/Encounter/_search?_cursor=B"),
        "B": _bundle(["e5"], total=5),
    }
    raws = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if (r := _token(request)) is not None:
            return r
        assert request.headers["authorization"] == "Bearer tok"
        cursor = request.url.params.get("_cursor")
        if cursor is None:
            assert request.method == "POST"
            form = dict(x.split("=") for x in request.content.decode().split("&"))
            assert form["patient"] == "p1%2Cp2"
        raws[cursor] = json.dumps(pages[cursor], indent=1).encode()
        return httpx.Response(200, content=raws[cursor], headers={"content-type": "application/fhir+json"})

    async with _client(tmp_path, key, handler) as client:
        got = [p async for p in client.fhir.search("Encounter", params={"patient": "p1,p2"})]
        frame = client.audit_frame()
    assert [p.entries for p in got] == [2, 2, 1]
    assert [p.number for p in got] == [1, 2, 3]
    assert got[0].raw == raws[None] and got[2].raw == raws["B"]
    assert got[0].total == 5 and [r["id"] for r in got[1].resources] == ["e3", "e4"]
    assert "p1" not in repr(got[0])
    assert frame.schema == API_CALLS
    assert frame["surface"].to_list() == ["auth", "fhir", "fhir", "fhir"]
    assert frame["endpoint"].to_list()[1:] == [
        "POST /fhir/R4/{org}/{env}/Encounter/_search",
        "GET /fhir/R4/{org}/{env}/Encounter?{next-page}",
        "GET /fhir/R4/{org}/{env}/Encounter?{next-page}",
    ]
    assert frame["run_id"].unique().to_list() == ["run-1"]
    assert (frame["bytes"] > 0).all()
    # No value of the request anywhere in the audit trail.
    dumped = frame.write_csv()
    assert "p1" not in dumped and "_cursor" not in dumped


async def test_total_mismatch_raises_and_duplicates_are_counted_once(tmp_path, key):
    def handler(pages):
        def h(request):
            if (r := _token(request)) is not None:
                return r
            return httpx.Response(200, json=pages[request.url.params.get("_cursor")])

        return h

    dup = {
        None: _bundle(["e1", "e2"], total=3, next_url=f"{FHIR}/Encounter/_search?_cursor=A"),
        "A": _bundle(["e2", "e3"], total=3),
    }
    async with _client(tmp_path, key, handler(dup)) as client:
        got = [p async for p in client.fhir.search("Encounter")]
    assert [p.duplicates for p in got] == [0, 1]

    short = {None: _bundle(["e1", "e2"], total=3)}
    async with _client(tmp_path, key, handler(short)) as client:
        with pytest.raises(PageTotalMismatch, match="total said 3") as info:
            [p async for p in client.fhir.search("Encounter")]
    assert info.value.received == 2

    includes = {
        None: _bundle(["e1"], total=1)
        | {"entry": _bundle(["e1"])["entry"] + _bundle(["x"], mode="include")["entry"]}
    }
    async with _client(tmp_path, key, handler(includes)) as client:
        got = [p async for p in client.fhir.search("Encounter")]
    assert got[0].entries == 2


async def test_next_link_to_another_host_is_refused(tmp_path, key):
    def handler(request):
        if (r := _token(request)) is not None:
            return r
        return httpx.Response(200, json=_bundle(["e1"], next_url="https://evil.example/steal"))

    async with _client(tmp_path, key, handler) as client:
        with pytest.raises(RedoxRequestError, match="another host"):
            [p async for p in client.fhir.search("Encounter")]


async def test_4xx_carries_server_text_without_the_values_sent(tmp_path, key):
    def handler(request):
        if (r := _token(request)) is not None:
            return r
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "invalid", "diagnostics": "No patient MRN-000123 here"}],
        }
        return httpx.Response(400, json=outcome)

    async with _client(tmp_path, key, handler) as client:
        with pytest.raises(RedoxRequestError) as info:
            [p async for p in client.fhir.search("Encounter", params={"patient": "MRN-000123,MRN-9"})]
        assert len(client.audit) == 2  # not retried
    message = str(info.value)
    assert "POST /fhir/R4/{org}/{env}/Encounter/_search" in message
    assert "HTTP 400" in message and "No patient [redacted] here" in message
    assert "MRN-000123" not in message and "What to do" in message


async def test_5xx_and_timeouts_and_garbled_bodies_are_retried(tmp_path, key):
    script = iter(["500", "timeout", "garbled", "ok"])

    def handler(request):
        if (r := _token(request)) is not None:
            return r
        step = next(script)
        if step == "500":
            return httpx.Response(502, text="bad gateway")
        if step == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if step == "garbled":
            return httpx.Response(200, content=b'{"resourceType": "Bun')
        return httpx.Response(200, json=_bundle(["e1"], total=1))

    async with _client(tmp_path, key, handler) as client:
        got = [p async for p in client.fhir.search("Encounter")]
        statuses = client.audit_frame().filter(pl.col("surface") == "fhir")["status"].to_list()
        attempts = client.audit_frame().filter(pl.col("surface") == "fhir")["attempt"].to_list()
    assert got[0].entries == 1
    assert statuses == [502, None, 200, 200]
    assert attempts == [1, 2, 3, 4]


async def test_retries_run_out_with_a_typed_error(tmp_path, key):
    def failing(request):
        if (r := _token(request)) is not None:
            return r
        return httpx.Response(
            503, json={"resourceType": "OperationOutcome", "issue": [{"diagnostics": "down"}]}
        )

    async with _client(tmp_path, key, failing) as client:
        with pytest.raises(RedoxServerError, match="HTTP 503: Redox said: down"):
            [p async for p in client.fhir.search("Encounter")]

    def refusing(request):
        raise httpx.ConnectError("refused", request=request)

    async with _client(tmp_path, key, refusing) as client:
        with pytest.raises(RedoxConnectionError, match="ConnectError"):
            [p async for p in client.fhir.search("Encounter")]
        assert len(client.audit) == 4


async def test_401_refreshes_the_token_once(tmp_path, key):
    tokens = iter(["t1", "t2", "t3"])
    seen = []

    def handler(request):
        if request.url.path == "/v2/auth/token":
            return httpx.Response(
                200, json={"access_token": next(tokens), "token_type": "bearer", "expires_in": 300}
            )
        seen.append(request.headers["authorization"])
        if request.headers["authorization"] == "Bearer t1":
            return httpx.Response(
                401, json={"resourceType": "OperationOutcome", "issue": [{"diagnostics": "expired"}]}
            )
        return httpx.Response(200, json=_bundle([], total=0))

    async with _client(tmp_path, key, handler) as client:
        [p async for p in client.fhir.search("Encounter")]
        [p async for p in client.fhir.search("Encounter")]
    assert seen == ["Bearer t1", "Bearer t2", "Bearer t2"]

    def always_401(request):
        if (r := _token(request)) is not None:
            return r
        return httpx.Response(
            401, json={"resourceType": "OperationOutcome", "issue": [{"diagnostics": "no"}]}
        )

    async with _client(tmp_path, key, always_401) as client:
        with pytest.raises(RedoxAuthError):
            [p async for p in client.fhir.search("Encounter")]
        assert client.audit_frame()["status"].to_list() == [200, 401, 200, 401]


async def test_unknown_kid_falls_over_to_the_next_key(tmp_path, key):
    second = SigningKey.from_pem("kid-2", key.private_key_pem.get_secret_value(), origin="test")
    kids = []

    def handler(request):
        if request.url.path == "/v2/auth/token":
            assertion = dict(x.split("=") for x in request.content.decode().split("&"))["client_assertion"]
            kid = jwt.get_unverified_header(assertion)["kid"]
            kids.append(kid)
            if kid == "kid-1":
                return httpx.Response(
                    401,
                    json={
                        "error": "invalid_client",
                        "error_description": (
                            "Public key not found, check client_id, kid and Redox dashboard settings"
                        ),
                    },
                )
            return httpx.Response(200, json={"access_token": "ok", "expires_in": 300})
        return httpx.Response(200, json=_bundle([], total=0))

    async with _client(tmp_path, key, handler, keys=(key, second)) as client:
        [p async for p in client.fhir.search("Encounter")]
        assert client.authorizer("oauth").active_kid == "kid-2"  # type: ignore[union-attr]
        [p async for p in client.fhir.search("Encounter")]
    assert kids == ["kid-1", "kid-2"]  # the cached token served the second search


async def test_429_slows_the_shared_budget_then_succeeds(tmp_path, key):
    script = iter([429, 200])

    def handler(request):
        if (r := _token(request)) is not None:
            return r
        status = next(script)
        if status == 429:
            return httpx.Response(429, headers={"X-RateLimit-Limit": "7500", "Retry-After": "0"}, text="")
        return httpx.Response(200, json=_bundle([], total=0))

    async with _client(tmp_path, key, handler) as client:
        [p async for p in client.fhir.search("Encounter")]
        penalty = client.budget.penalty()
    assert penalty.strikes == 1 and penalty.factor == 2


async def test_search_patients_batches_and_runs_concurrently(tmp_path, key):
    seen_batches = []

    def handler(request):
        if (r := _token(request)) is not None:
            return r
        form = httpx.QueryParams(request.content.decode())
        ids = form["patient"].split(",")
        seen_batches.append(ids)
        return httpx.Response(200, json=_bundle([f"enc-{i}" for i in ids], total=len(ids)))

    ids = [f"p{i:03d}" for i in range(23)]
    async with _client(tmp_path, key, handler) as client:
        pages = [
            p async for p in client.fhir.search_patients("Encounter", patients=ids + ids[:3], batch_size=10)
        ]
    assert sorted(len(b) for b in seen_batches) == [3, 10, 10]
    assert sorted(p.batch for p in pages) == [0, 1, 2]
    assert sorted(r["id"] for p in pages for r in p.resources) == sorted(f"enc-{i}" for i in ids)


def test_batches_respect_count_and_length():
    assert batches(["a", "b", "c"], size=2) == [["a", "b"], ["c"]]
    long = ["x" * 40 for _ in range(3)]
    assert [len(b) for b in batches([f"{i}{v}" for i, v in enumerate(long)], size=50, max_chars=90)] == [2, 1]
    with pytest.raises(ValueError):
        batches(["a,b"], size=2)


def test_date_window_is_half_open_utc():
    w = date_window(datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC))
    assert w == {"date": ["ge2024-01-01T00:00:00Z", "lt2024-01-02T00:00:00Z"]}
    with pytest.raises(ValueError, match="naive"):
        date_window(datetime(2024, 1, 1), datetime(2024, 1, 2))


async def test_datamodel_meta_and_errors(tmp_path, key):
    bodies = []

    def handler(request):
        if request.url.path == "/auth/authenticate":
            return httpx.Response(
                200, json={"accessToken": "L1", "expires": "2099-01-01T00:00:00.000Z", "refreshToken": "R1"}
            )
        assert request.url.path == "/endpoint"
        assert request.headers["authorization"] == "Bearer L1"
        body = json.loads(request.content)
        bodies.append(body)
        if body["Meta"]["DataModel"] == "PatientSearch":
            return httpx.Response(
                400,
                json={
                    "Meta": {"DataModel": "PatientSearch", "Errors": [{"Text": "No match for MRN-42 found"}]}
                },
            )
        if body["Meta"]["DataModel"] == "Scheduling":
            return httpx.Response(
                200, json={"Meta": {"DataModel": "Scheduling", "Errors": [{"Text": "No subscriptions"}]}}
            )
        return httpx.Response(200, json={"Meta": {"DataModel": "Results", "Errors": []}, "Orders": []})

    start, end = datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 3, 2, tzinfo=UTC)
    async with _client(
        tmp_path, key, handler, datamodel_auth="legacy", api_key="k", api_secret="s"
    ) as client:
        reply = await client.datamodel.results_query(
            start=start, end=end, patients=[{"ID": "MRN-1", "IDType": "MR"}]
        )
        with pytest.raises(RedoxDataModelError) as info:
            await client.datamodel.patient_search(identifiers=[{"ID": "MRN-42", "IDType": "MR"}])
        with pytest.raises(RedoxDataModelError, match="No subscriptions"):
            await client.datamodel.scheduling_booked(start=start, end=end)
    assert reply.json["Orders"] == [] and reply.raw.startswith(b"{")
    meta = bodies[0]["Meta"]
    assert meta["DataModel"] == "Results" and meta["EventType"] == "Query" and meta["Test"] is True
    assert meta["Destinations"] == [{"ID": "dest-r"}] and meta["Source"] == {"ID": "src-1"}
    assert bodies[0]["Completion"] == {
        "StartDateTime": "2024-03-01T00:00:00.000Z",
        "EndDateTime": "2024-03-02T00:00:00.000Z",
    }
    assert bodies[0]["Patients"] == [{"Identifiers": [{"ID": "MRN-1", "IDType": "MR"}]}]
    assert info.value.texts == ["No match for [redacted] found"] and info.value.status == 400
    assert "MRN-42" not in str(info.value)
