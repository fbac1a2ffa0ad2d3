"""Client assertions: the JWT Redox documents, signed with RS384 or ES384, fresh every time."""

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from resources.redox.auth import _lifetime, client_assertion
from resources.redox.settings import SigningKey


def _key(kind: str):
    private = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "RS384"
        else ec.generate_private_key(ec.SECP384R1())
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return SigningKey.from_pem(f"kid-{kind}", pem, origin="test"), private.public_key()


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_assertion_claims_and_signature(alg):
    key, public = _key(alg)
    audience = "https://api.redoxengine.com/v2/auth/token"
    before = int(time.time())
    token = client_assertion(client_id="cid", audience=audience, key=key)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": alg, "kid": f"kid-{alg}", "typ": "JWT"}
    claims = jwt.decode(token, key=public, algorithms=[alg], audience=audience)
    assert claims["iss"] == claims["sub"] == "cid"
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] == claims["iat"] + 300
    assert len(claims["jti"]) >= 16


def test_every_assertion_has_a_new_jti():
    key, _ = _key("RS384")
    jtis = {
        jwt.decode(
            client_assertion(client_id="c", audience="a", key=key), options={"verify_signature": False}
        )["jti"]
        for _ in range(20)
    }
    assert len(jtis) == 20


def test_legacy_expiry_forms():
    soon = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() + 3600))
    assert 3500 < _lifetime(soon) <= 3600
    assert _lifetime(120) == 120
    assert 3500 < _lifetime(time.time() + 3600) <= 3600
    assert _lifetime(None) == 300
