"""Auth against a real sandbox: the documented success and every documented error."""

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from sandbox import auth
from sandbox.server import Running, serve_in_thread

pytestmark = pytest.mark.integration


def _key(creds: dict[str, Any], second: bool = False) -> auth.KeyPair:
    prefix = "second_" if second else ""
    private = serialization.load_pem_private_key(creds[f"{prefix}private_key_pem"].encode(), None)
    return auth.KeyPair(creds[f"{prefix}kid"], creds[f"{prefix}algorithm"], private)  # type: ignore[arg-type]


def _form(assertion: str | None, **overrides: str | None) -> dict[str, str]:
    form: dict[str, str | None] = {
        "grant_type": "client_credentials",
        "client_assertion_type": auth.ASSERTION_TYPE,
        "client_assertion": assertion,
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v is not None}


def _assertion(creds: dict[str, Any], *, second: bool = False, **claims: Any) -> str:
    return auth.make_assertion(creds["client_id"], _key(creds, second), creds["token_url"], **claims)


def _post(creds: dict[str, Any], data: dict[str, str], url: str | None = None) -> httpx.Response:
    return httpx.post(url or creds["token_url"], data=data)


def _error(response: httpx.Response, status: int, error: str, description: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert body["error_description"] == description
    assert body["error_uri"].startswith("https://docs.redoxengine.com/")


def test_token_success(sandbox: Running) -> None:
    creds = sandbox.credentials
    response = _post(creds, _form(_assertion(creds)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    search = httpx.post(
        f"{creds['fhir_base']}/Patient/_search",
        data={"_id": "nobody"},
        headers={"Authorization": f"Bearer {body['access_token']}"},
    )
    assert search.status_code == 200
    assert search.json()["total"] == 0


def test_second_key_es384_and_alias_and_production_audience(sandbox: Running) -> None:
    creds = sandbox.credentials
    assert creds["second_algorithm"] == "ES384"
    assert _post(creds, _form(_assertion(creds, second=True))).status_code == 200
    alias = f"{creds['base_url']}/oauth/token"
    assert _post(creds, _form(_assertion(creds)), url=alias).status_code == 200
    production = _assertion(creds, aud="https://api.redoxengine.com/v2/auth/token")
    assert _post(creds, _form(production)).status_code == 200


def test_scope_is_echoed(sandbox: Running) -> None:
    creds = sandbox.credentials
    response = _post(creds, _form(_assertion(creds), scope="fhir:read"))
    assert response.json()["scope"] == "fhir:read"


@pytest.mark.parametrize(
    ("form", "description"),
    [
        ({"grant_type": None}, "Missing grant_type parameter"),
        ({"grant_type": "password"}, "The grant_type parameter should equal 'client_credentials'"),
        ({"client_assertion_type": None}, "Missing client assertion type"),
        ({"client_assertion_type": "urn:nope"}, "Invalid client assertion type"),
        ({"client_assertion": None}, "Missing client assertion"),
    ],
)
def test_form_errors(sandbox: Running, form: dict[str, str | None], description: str) -> None:
    creds = sandbox.credentials
    data = _form(_assertion(creds), **form)
    _error(_post(creds, data), 400, "invalid_request", description)


def test_content_type_error(sandbox: Running) -> None:
    creds = sandbox.credentials
    response = httpx.post(creds["token_url"], json=_form(_assertion(creds)))
    _error(response, 400, "invalid_request", "x-www-form-urlencoded content-type required")


def test_kid_required(sandbox: Running) -> None:
    creds = sandbox.credentials
    now = int(time.time())
    claims = {"iss": creds["client_id"], "sub": creds["client_id"], "aud": creds["token_url"]}
    claims |= {"iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
    no_kid = jwt.encode(claims, _key(creds).private_key, algorithm="RS384")
    _error(_post(creds, _form(no_kid)), 400, "invalid_request", "JWT header kid property is required")


def test_public_key_not_found(sandbox: Running) -> None:
    creds = sandbox.credentials
    unknown_kid = auth.KeyPair("not-registered", "RS384", _key(creds).private_key)
    assertion = auth.make_assertion(creds["client_id"], unknown_kid, creds["token_url"])
    _error(_post(creds, _form(assertion)), 401, "invalid_client", auth.PUBLIC_KEY_NOT_FOUND)
    other_client = auth.make_assertion("someone-else", _key(creds), creds["token_url"])
    _error(_post(creds, _form(other_client)), 401, "invalid_client", auth.PUBLIC_KEY_NOT_FOUND)


def test_bad_signature(sandbox: Running) -> None:
    creds = sandbox.credentials
    impostor = auth.new_rsa_key(creds["kid"])
    assertion = auth.make_assertion(creds["client_id"], impostor, creds["token_url"])
    _error(_post(creds, _form(assertion)), 401, "invalid_client", "")


@pytest.mark.parametrize(
    "claims",
    [
        lambda now: {"aud": "https://example.com/token"},
        lambda now: {"sub": "somebody"},
        lambda now: {"iat": now - 600},
        lambda now: {"iat": now + 120},
        lambda now: {"exp": now - 120},
        lambda now: {"jti": ""},
    ],
    ids=["aud", "sub", "iat-old", "iat-future", "expired", "no-jti"],
)
def test_blank_description_for_wrong_claims(
    sandbox: Running, claims: Callable[[int], dict[str, Any]]
) -> None:
    # Times are taken when the test runs, not when it is collected: a long suite reaches this test
    # minutes after collection, when a "future" iat from then is already past.
    creds = sandbox.credentials
    _error(_post(creds, _form(_assertion(creds, **claims(int(time.time()))))), 400, "invalid_request", "")


def test_iat_within_skew_is_accepted(sandbox: Running) -> None:
    creds = sandbox.credentials
    assert _post(creds, _form(_assertion(creds, iat=int(time.time()) + 5))).status_code == 200
    assert _post(creds, _form(_assertion(creds, iat=int(time.time()) - 290))).status_code == 200


def test_jti_replay_refused(sandbox: Running) -> None:
    creds = sandbox.credentials
    assertion = _assertion(creds)
    assert _post(creds, _form(assertion)).status_code == 200
    _error(_post(creds, _form(assertion)), 400, "invalid_request", "")


def test_wrong_algorithm_for_key(sandbox: Running) -> None:
    creds = sandbox.credentials
    hs = jwt.encode(
        {
            "iss": creds["client_id"],
            "sub": creds["client_id"],
            "aud": creds["token_url"],
            "iat": int(time.time()),
        },
        "secret-of-at-least-forty-eight-bytes-for-hs384-signing-key!!",
        algorithm="HS384",
        headers={"kid": creds["kid"]},
    )
    _error(_post(creds, _form(hs)), 400, "invalid_request", "")


def test_missing_and_unknown_bearer_on_every_surface(sandbox: Running) -> None:
    creds = sandbox.credentials
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic abc"}):
        fhir = httpx.post(f"{creds['fhir_base']}/Patient/_search", data={"_id": "x"}, headers=headers)
        assert fhir.status_code == 401
        assert fhir.json()["resourceType"] == "OperationOutcome"
        read = httpx.get(f"{creds['fhir_base']}/Patient/x", headers=headers)
        assert read.status_code == 401
        dm = httpx.post(creds["datamodel_url"], json={"Meta": {"DataModel": "Results"}}, headers=headers)
        assert dm.status_code == 401
        errors = dm.json()["Meta"]["Errors"]
        assert errors and set(errors[0]) == {"ID", "Text", "Type", "Module"}


def test_expired_token_gets_401() -> None:
    with serve_in_thread(patients=10, token_ttl=1, rate_limit=None) as running:
        creds = running.credentials
        token = _post(creds, _form(_assertion(creds))).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        url = f"{creds['fhir_base']}/Patient/_search"
        assert httpx.post(url, data={"_id": "x"}, headers=headers).status_code == 200
        time.sleep(1.2)
        expired = httpx.post(url, data={"_id": "x"}, headers=headers)
        assert expired.status_code == 401
        assert "expired" in expired.json()["issue"][0]["diagnostics"]
        dm = httpx.post(creds["datamodel_url"], json={"Meta": {}}, headers=headers)
        assert dm.status_code == 401


def test_legacy_authenticate_and_refresh(sandbox: Running) -> None:
    creds = sandbox.credentials
    base = creds["base_url"]
    response = httpx.post(
        f"{base}/auth/authenticate",
        json={"apiKey": creds["legacy_api_key"], "secret": creds["legacy_secret"]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"accessToken", "expires", "refreshToken"}
    uuid.UUID(body["accessToken"])
    assert body["expires"].endswith("Z")
    legacy = {"Authorization": f"Bearer {body['accessToken']}"}
    dm = httpx.post(
        creds["datamodel_url"],
        json={"Meta": {"DataModel": "PatientSearch", "EventType": "Query"}, "Patient": {"Identifiers": []}},
        headers=legacy,
    )
    assert dm.status_code == 200
    # Legacy keys are for the Data Model API only.
    fhir = httpx.post(f"{creds['fhir_base']}/Patient/_search", data={"_id": "x"}, headers=legacy)
    assert fhir.status_code == 401

    refreshed = httpx.post(
        f"{base}/auth/refreshToken",
        json={"apiKey": creds["legacy_api_key"], "refreshToken": body["refreshToken"]},
    )
    assert refreshed.status_code == 200
    assert refreshed.json()["accessToken"] != body["accessToken"]
    reused = httpx.post(
        f"{base}/auth/refreshToken",
        json={"apiKey": creds["legacy_api_key"], "refreshToken": body["refreshToken"]},
    )
    assert reused.status_code == 401


def test_legacy_bad_secret(sandbox: Running) -> None:
    creds = sandbox.credentials
    response = httpx.post(
        f"{creds['base_url']}/auth/authenticate", json={"apiKey": creds["legacy_api_key"], "secret": "wrong"}
    )
    assert response.status_code == 401
    assert httpx.post(f"{creds['base_url']}/auth/authenticate", content=b"nope").status_code == 400
