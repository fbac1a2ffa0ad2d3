"""Settings from the environment: keys, key files and their permissions, sandbox fallback, secrecy."""

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from resources.redox.errors import RedoxConfigError
from resources.redox.settings import RateSpec, RedoxSettings


def _pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_pem() -> str:
    return _pem(ec.generate_private_key(ec.SECP384R1()))


def _base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "REDOX_BASE_URL": "https://api.redoxengine.com/",
        "REDOX_CLIENT_ID": "client-1",
        "REDOX_FHIR_ORG": "acme",
        "REDOX_ENVIRONMENT": "Staging",
        "REDOX_BUDGET_PATH": str(tmp_path / "budget.sqlite"),
        **extra,
    }


def test_env_inline_key_and_next_key(tmp_path, rsa_pem, ec_pem):
    env = _base_env(
        tmp_path,
        REDOX_KID="k1",
        REDOX_PRIVATE_KEY=rsa_pem,
        REDOX_NEXT_KID="k2",
        REDOX_NEXT_PRIVATE_KEY=ec_pem,
        REDOX_DESTINATION_ID_RESULTS="dest-results",
        REDOX_RATE_LIMIT="600/30",
        REDOX_RATE_LIMIT_FHIR="100/30",
        REDOX_RATE_MARGIN="0.9",
        REDOX_MAX_IN_FLIGHT="4",
    )
    s = RedoxSettings.from_env(env)
    assert [(k.kid, k.alg) for k in s.keys] == [("k1", "RS384"), ("k2", "ES384")]
    assert s.base_url == "https://api.redoxengine.com"
    assert s.host == "api.redoxengine.com"
    assert s.token_url == "https://api.redoxengine.com/v2/auth/token"
    assert s.fhir_base == "https://api.redoxengine.com/fhir/R4/acme/Staging"
    assert s.datamodel_url == "https://api.redoxengine.com/endpoint"
    assert s.destination_ids == {"results": "dest-results"}
    assert s.rate_limit == RateSpec(limit=600, seconds=30)
    assert s.sub_limits == {"fhir": RateSpec(limit=100, seconds=30)}
    assert s.rate_margin == 0.9 and s.max_in_flight == 4
    assert s.datamodel_auth == "oauth"


def test_secrets_never_in_repr(tmp_path, rsa_pem):
    env = _base_env(
        tmp_path,
        REDOX_KID="k1",
        REDOX_PRIVATE_KEY=rsa_pem,
        REDOX_API_KEY="ak-123",
        REDOX_API_SECRET="s3cr3t!",
    )
    s = RedoxSettings.from_env(env)
    text = repr(s) + str(s) + repr(s.keys)
    assert "PRIVATE KEY" not in text
    assert "s3cr3t!" not in text and "ak-123" not in text


def test_key_file_must_be_owner_only(tmp_path, rsa_pem):
    path = tmp_path / "key.pem"
    path.write_text(rsa_pem)
    os.chmod(path, 0o644)
    env = _base_env(tmp_path, REDOX_KID="k1", REDOX_PRIVATE_KEY_FILE=str(path))
    with pytest.raises(RedoxConfigError) as info:
        RedoxSettings.from_env(env)
    message = str(info.value)
    assert "0644" in message and "chmod 600" in message
    assert "PRIVATE KEY" not in message
    os.chmod(path, 0o600)
    assert RedoxSettings.from_env(env).keys[0].kid == "k1"


def test_key_file_jwks_with_several_keys_starts_with_redox_kid(tmp_path, rsa_pem, ec_pem):
    jwks = {"keys": []}
    for kid, pem, algo in (("old", rsa_pem, RSAAlgorithm), ("new", ec_pem, ECAlgorithm)):
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        jwk = json.loads(algo.to_jwk(key))
        jwk["kid"] = kid
        jwks["keys"].append(jwk)
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(jwks))
    os.chmod(path, 0o600)
    s = RedoxSettings.from_env(_base_env(tmp_path, REDOX_KID="new", REDOX_PRIVATE_KEY_FILE=str(path)))
    assert [(k.kid, k.alg) for k in s.keys] == [("new", "ES384"), ("old", "RS384")]


def test_unusable_key_is_refused_without_echoing_it(tmp_path):
    # A PEM header around junk, built from parts so no key-shaped text is committed.
    junk_pem = "-----" + " ".join(("BEGIN", "PRIVATE", "KEY")) + "-----\nnotakey\n"
    env = _base_env(tmp_path, REDOX_KID="k1", REDOX_PRIVATE_KEY=junk_pem)
    with pytest.raises(RedoxConfigError) as info:
        RedoxSettings.from_env(env)
    assert "notakey" not in str(info.value)


def test_legacy_only_env_uses_legacy_for_datamodel(tmp_path):
    s = RedoxSettings.from_env(_base_env(tmp_path, REDOX_API_KEY="k", REDOX_API_SECRET="s"))
    assert s.datamodel_auth == "legacy" and s.keys == ()


def test_falls_back_to_sandbox_credentials(tmp_path, rsa_pem):
    home = {"REDOX_ETL_HOME": str(tmp_path)}
    creds = {
        "base_url": "http://127.0.0.1:5555",
        "token_url": "http://127.0.0.1:5555/v2/auth/token",
        "fhir_base": "http://127.0.0.1:5555/fhir/R4/sandbox-org/Development",
        "datamodel_url": "http://127.0.0.1:5555/endpoint",
        "client_id": "sandbox-client",
        "kid": "kid-a",
        "private_key_pem": rsa_pem,
        "legacy_api_key": "lk",
        "legacy_secret": "ls",
    }
    path = tmp_path / "sandbox" / "credentials.json"
    path.parent.mkdir()
    path.write_text(json.dumps(creds))
    os.chmod(path, 0o600)
    s = RedoxSettings.from_env({**home, "REDOX_RATE_LIMIT": "300/20"})
    assert s.base_url == "http://127.0.0.1:5555"
    assert s.fhir_org == "sandbox-org" and s.environment == "Development"
    assert s.fhir_base == creds["fhir_base"]
    assert s.keys[0].kid == "kid-a" and s.client_id == "sandbox-client"
    assert s.api_key is not None and s.api_key.get_secret_value() == "lk"
    assert s.rate_limit.limit == 300
    assert s.budget_path == tmp_path / "budget.sqlite"
    # Explicit variables still win over the file.
    assert RedoxSettings.from_env({**home, "REDOX_DATAMODEL_AUTH": "legacy"}).datamodel_auth == "legacy"
    # Only a connection to the sandbox has a ground truth to measure against.
    assert s.sandbox
    assert not RedoxSettings.from_env(home, base_url="https://api.redoxengine.com").sandbox
    assert not RedoxSettings.from_env(_base_env(tmp_path, REDOX_API_KEY="k", REDOX_API_SECRET="s")).sandbox


def test_missing_everything_says_what_to_do(tmp_path):
    with pytest.raises(RedoxConfigError, match="redox-etl sandbox serve"):
        RedoxSettings.from_env({"REDOX_ETL_HOME": str(tmp_path)})


@pytest.mark.parametrize("text", ["7500", "abc/300", "7500/"])
def test_bad_rate_limit(text):
    with pytest.raises(RedoxConfigError, match="REDOX_RATE_LIMIT"):
        RateSpec.parse(text)


def test_budget_backend_from_url(tmp_path):
    env = _base_env(tmp_path, REDOX_BUDGET_BACKEND="redis://:pw@cache:6379/0")
    s = RedoxSettings.from_env(env)
    assert s.budget_backend == "redis"
    assert s.budget_url is not None and "pw" not in repr(s)
