"""Redox authentication as documented: OAuth client credentials with a signed JWT, and legacy keys.

The sandbox plays Redox's token server. A client registers public keys (several per client, so
rotation works); a token request carries a JWT signed with the matching private key; the answer is an
opaque bearer token that expires after ``token_ttl`` seconds. Legacy ``apiKey``/``secret`` tokens
(24 h, UUIDs) exist too and open only the Data Model surface, as Redox documents.

Invariants:
- private keys never leave the process except through the 0600 credentials file the server writes;
  nothing here logs a token, an assertion or a key;
- a ``jti`` is accepted once (replays are refused for as long as the assertion could still be valid);
- an access token opens only the surfaces its kind allows (OAuth: every surface; legacy: Data Model).
"""

import dataclasses
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PRODUCTION_BASE = "https://api.redoxengine.com"
TOKEN_PATHS = ("/v2/auth/token", "/oauth/token")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ERROR_URI = "https://docs.redoxengine.com/permalink/7sEi7MTFssZ1JuHpUYLeYJ"
PUBLIC_KEY_NOT_FOUND = "Public key not found, check client_id, kid and Redox dashboard settings"
# Redox documents iat "within the past 5 minutes" with 10 s of clock skew.
IAT_MAX_AGE = 300
CLOCK_SKEW = 10
LEGACY_TTL = 24 * 3600
ALGORITHMS = ("RS384", "ES384")

Surface = Literal["fhir", "datamodel"]
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclasses.dataclass(frozen=True)
class AuthError(Exception):
    """A refused token request, rendered as Redox's ``{error, error_description, error_uri}``."""

    status: int
    error: str
    description: str

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description, "error_uri": ERROR_URI}


@dataclasses.dataclass(frozen=True)
class KeyPair:
    kid: str
    algorithm: str
    private_key: PrivateKey

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()

    def private_pem(self) -> str:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()


def new_rsa_key(kid: str) -> KeyPair:
    return KeyPair(kid, "RS384", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def new_ec_key(kid: str) -> KeyPair:
    return KeyPair(kid, "ES384", ec.generate_private_key(ec.SECP384R1()))


@dataclasses.dataclass(frozen=True)
class Grant:
    kind: Literal["oauth", "legacy"]
    client: str
    expires_at: float


class AuthService:
    """Token issuing and checking for one sandbox. Thread-safe: tests may call it from any thread."""

    def __init__(self, *, token_ttl: int = 300, clock: Callable[[], float] = time.time) -> None:
        self.token_ttl = token_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, dict[str, PublicKey]] = {}
        self._legacy: dict[str, str] = {}
        self._tokens: dict[str, Grant] = {}
        self._refresh: dict[str, str] = {}
        self._seen_jti: dict[tuple[str, str], float] = {}

    # -- registration -------------------------------------------------------------------------

    def register_key(self, client_id: str, kid: str, public_key: PublicKey) -> None:
        """Add a public key, as pasting one into the Redox dashboard (or a JWKS entry) would."""
        with self._lock:
            self._keys.setdefault(client_id, {})[kid] = public_key

    def unregister_key(self, client_id: str, kid: str) -> None:
        with self._lock:
            self._keys.get(client_id, {}).pop(kid, None)

    def register_legacy(self, api_key: str, secret: str) -> None:
        with self._lock:
            self._legacy[api_key] = secret

    # -- OAuth (private_key_jwt) ----------------------------------------------------------------

    def issue_oauth(
        self,
        form: Mapping[str, str],
        *,
        content_type: str,
        audiences: tuple[str, ...],
    ) -> dict[str, Any]:
        """Check a token request the way Redox's troubleshooting page describes; raise AuthError."""
        if content_type.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
            raise AuthError(400, "invalid_request", "x-www-form-urlencoded content-type required")
        grant_type = form.get("grant_type")
        if not grant_type:
            raise AuthError(400, "invalid_request", "Missing grant_type parameter")
        if grant_type != "client_credentials":
            raise AuthError(
                400, "invalid_request", "The grant_type parameter should equal 'client_credentials'"
            )
        assertion_type = form.get("client_assertion_type")
        if not assertion_type:
            raise AuthError(400, "invalid_request", "Missing client assertion type")
        if assertion_type != ASSERTION_TYPE:
            raise AuthError(400, "invalid_request", "Invalid client assertion type")
        assertion = form.get("client_assertion")
        if not assertion:
            raise AuthError(400, "invalid_request", "Missing client assertion")
        client_id = self._verify_assertion(assertion, audiences)
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._prune()
            self._tokens[token] = Grant("oauth", client_id, self._clock() + self.token_ttl)
        return {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.token_ttl,
            "scope": form.get("scope") or "*",
        }

    def _verify_assertion(self, assertion: str, audiences: tuple[str, ...]) -> str:
        # Redox gives a blank description whenever a claim value (aud, alg, jti, iat) is wrong.
        blank = AuthError(400, "invalid_request", "")
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise blank from None
        if not header.get("kid"):
            raise AuthError(400, "invalid_request", "JWT header kid property is required")
        if header.get("alg") not in ALGORITHMS:
            raise blank
        client_id = claims.get("iss")
        if not isinstance(client_id, str):
            raise AuthError(401, "invalid_client", PUBLIC_KEY_NOT_FOUND)
        with self._lock:
            key = self._keys.get(client_id, {}).get(header["kid"])
        if key is None:
            raise AuthError(401, "invalid_client", PUBLIC_KEY_NOT_FOUND)
        expected = "RS384" if isinstance(key, rsa.RSAPublicKey) else "ES384"
        if header["alg"] != expected:
            raise blank
        try:
            # Time claims are checked below with Redox's own window, not PyJWT's defaults.
            claims = jwt.decode(
                assertion,
                key=key,
                algorithms=[expected],
                options={"verify_aud": False, "verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.InvalidSignatureError:
            raise AuthError(401, "invalid_client", "") from None
        except jwt.PyJWTError:
            raise blank from None
        now = self._clock()
        iat, exp, jti = claims.get("iat"), claims.get("exp"), claims.get("jti")
        if claims.get("sub") != client_id or claims.get("aud") not in audiences:
            raise blank
        if not isinstance(iat, int | float) or not (
            now - IAT_MAX_AGE - CLOCK_SKEW <= iat <= now + CLOCK_SKEW
        ):
            raise blank
        if not isinstance(exp, int | float) or exp < now - CLOCK_SKEW:
            raise blank
        if not isinstance(jti, str) or not jti:
            raise blank
        with self._lock:
            if (client_id, jti) in self._seen_jti:
                raise blank
            # Remember the jti for as long as its assertion could pass the iat check.
            self._seen_jti[(client_id, jti)] = now + IAT_MAX_AGE + 2 * CLOCK_SKEW
        return client_id

    # -- legacy keys ----------------------------------------------------------------------------

    def issue_legacy(self, api_key: object, secret: object) -> dict[str, str]:
        with self._lock:
            known = isinstance(api_key, str) and self._legacy.get(api_key)
        if not known or not isinstance(secret, str) or not secrets.compare_digest(known, secret):
            raise AuthError(401, "invalid_client", "Invalid apiKey or secret")
        assert isinstance(api_key, str)
        return self._legacy_grant(api_key)

    def refresh_legacy(self, api_key: object, refresh_token: object) -> dict[str, str]:
        with self._lock:
            owner = self._refresh.pop(refresh_token, None) if isinstance(refresh_token, str) else None
        if owner is None or owner != api_key:
            raise AuthError(401, "invalid_client", "Invalid apiKey or refreshToken")
        return self._legacy_grant(owner)

    def _legacy_grant(self, api_key: str) -> dict[str, str]:
        access, refresh = str(uuid.uuid4()), str(uuid.uuid4())
        expires_at = self._clock() + LEGACY_TTL
        with self._lock:
            self._prune()
            self._tokens[access] = Grant("legacy", api_key, expires_at)
            self._refresh[refresh] = api_key
        expires = datetime.fromtimestamp(expires_at, UTC)
        return {
            "accessToken": access,
            "expires": expires.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "refreshToken": refresh,
        }

    # -- checking bearer tokens -----------------------------------------------------------------

    def check_bearer(self, authorization: str | None, surface: Surface) -> str | None:
        """None when the request may pass, else the reason it may not (never containing the token)."""
        if not authorization:
            return "Missing Authorization header with a Bearer token"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "Authorization header must be 'Bearer <token>'"
        grant = self._tokens.get(token.strip())
        if grant is None:
            return "Unknown bearer token"
        if grant.expires_at <= self._clock():
            return "Bearer token expired; request a new one"
        if grant.kind == "legacy" and surface != "datamodel":
            return "Legacy API key tokens are valid only for the Data Model API"
        return None

    def _prune(self) -> None:
        now = self._clock()
        if len(self._tokens) > 10_000:
            self._tokens = {t: g for t, g in self._tokens.items() if g.expires_at > now}
        if len(self._seen_jti) > 10_000:
            self._seen_jti = {k: until for k, until in self._seen_jti.items() if until > now}


def audiences_for(base_url: str) -> tuple[str, ...]:
    """Every token URL an assertion may name: this sandbox's and production's, on both paths."""
    bases = dict.fromkeys([base_url.rstrip("/"), PRODUCTION_BASE])
    return tuple(base + path for base in bases for path in TOKEN_PATHS)


def make_assertion(
    client_id: str,
    key: KeyPair,
    audience: str,
    *,
    now: float | None = None,
    lifetime: timedelta = timedelta(minutes=5),
    **overrides: Any,
) -> str:
    """A client assertion as Redox's public clients build it; tests and the demo use it."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": issued,
        "exp": issued + int(lifetime.total_seconds()),
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return jwt.encode(
        claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid, "typ": "JWT"}
    )
