"""Shared fixtures: a real Redox sandbox on an ephemeral loopback port, and a way to get a token.

The session sandbox is shared and read-mostly: a test that advances the clock, exhausts a rate limit
or injects faults starts its own server (``sandbox.server.serve_in_thread``) so it cannot disturb
others.
"""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from sandbox import auth
from sandbox.server import Running, serve_in_thread

SANDBOX_PATIENTS = 120


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Running]:
    """A sandbox with a small population, no rate limit and no faults, for the whole session."""
    with serve_in_thread(patients=SANDBOX_PATIENTS, seed=7, rate_limit=None) as running:
        yield running


def signing_key(credentials: dict[str, Any], *, second: bool = False) -> auth.KeyPair:
    prefix = "second_" if second else ""
    pem = credentials[f"{prefix}private_key_pem"].encode()
    private = serialization.load_pem_private_key(pem, password=None)
    return auth.KeyPair(credentials[f"{prefix}kid"], credentials[f"{prefix}algorithm"], private)  # type: ignore[arg-type]


def fetch_token(credentials: dict[str, Any], **claims: Any) -> httpx.Response:
    """POST a client-credentials token request signed with the sandbox's first key."""
    assertion = auth.make_assertion(
        credentials["client_id"], signing_key(credentials), credentials["token_url"], **claims
    )
    return httpx.post(
        credentials["token_url"],
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": auth.ASSERTION_TYPE,
            "client_assertion": assertion,
        },
    )


@pytest.fixture(scope="session")
def bearer() -> Callable[[Running], dict[str, str]]:
    """``bearer(running)`` -> Authorization headers with a fresh OAuth token for that sandbox."""

    def headers(running: Running) -> dict[str, str]:
        response = fetch_token(running.credentials)
        response.raise_for_status()
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    return headers


@pytest.fixture
def isolated_lake_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fresh REDOX_ETL_HOME and none of the lake settings a developer's shell may carry."""
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path / "home"))
    for name in ("REDOX_LAKE_CATALOG", "REDOX_LAKE_DATA_PATH", "REDOX_ETL_LAKE"):
        monkeypatch.delenv(name, raising=False)
