"""Authentication to Redox: OAuth client credentials with signed JWT assertions, and legacy API keys.

Invariants:
- each client assertion is freshly signed (RS384 or ES384, PyJWT) with a new random ``jti`` and a
  five-minute life, as Redox documents;
- one access token is cached per client and refreshed before it expires (at ``REFRESH_AT`` of its
  life) or when the server refuses it (401); concurrent callers share one fetch;
- several keys can be configured (kid -> key): when Redox answers "Public key not found" for the
  active kid, the next key is tried and, if accepted, becomes the active one, so a key rotates
  without downtime;
- a secret never reaches a log line, a repr or an exception message: tokens, assertions and keys
  are only handed to the transport, which redacts every value it sent from server text.
"""

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from resources.redox.errors import RedoxAuthError, RedoxConfigError
from resources.redox.settings import RedoxSettings, SigningKey
from resources.redox.transport import Transport

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME_S = 300
# Refresh once 80% of the token's life is gone: early enough that a request queued behind the rate
# budget still carries a valid token when it is finally sent.
REFRESH_AT = 0.8
_KEY_NOT_FOUND = "public key not found"


class _CachedToken:
    __slots__ = ("expires_at", "refresh_at", "value")

    def __init__(self, value: str, lifetime_s: float) -> None:
        now = time.monotonic()
        self.value = value
        self.refresh_at = now + lifetime_s * REFRESH_AT
        self.expires_at = now + lifetime_s

    def fresh(self) -> bool:
        return time.monotonic() < self.refresh_at

    def __repr__(self) -> str:
        return "_CachedToken(<hidden>)"


_loaded_keys: dict[tuple[str, str], PrivateKeyTypes] = {}


def _private_key(key: SigningKey) -> PrivateKeyTypes:
    """Parse a PEM once per process; signing then costs only the signature."""
    pem = key.private_key_pem.get_secret_value()
    cache_key = (key.kid, str(hash(pem)))
    if cache_key not in _loaded_keys:
        _loaded_keys[cache_key] = serialization.load_pem_private_key(pem.encode(), password=None)
    return _loaded_keys[cache_key]


def client_assertion(*, client_id: str, audience: str, key: SigningKey, now: float | None = None) -> str:
    """A signed JWT proving possession of ``key``: iss = sub = client id, aud = the token URL."""
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": issued,
        "exp": issued + ASSERTION_LIFETIME_S,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(
        claims,
        _private_key(key),  # type: ignore[arg-type]
        algorithm=key.alg,
        headers={"kid": key.kid, "typ": "JWT"},
    )


class _TokenCache:
    """One cached token per authorizer, refreshed by one task at a time; subclasses say how a new
    token is obtained (``_obtain``)."""

    _token: _CachedToken | None
    _lock: asyncio.Lock

    async def _obtain(self) -> _CachedToken:
        raise NotImplementedError

    async def authorization(self) -> str:
        token = self._token
        if token is not None and token.fresh():
            return token.value
        async with self._lock:
            # Another task may have refreshed while this one waited for the lock.
            if self._token is None or not self._token.fresh():
                self._token = await self._obtain()
            return self._token.value

    async def invalidate(self, value: str) -> None:
        async with self._lock:
            if self._token is not None and self._token.value == value:
                self._token = None


class OAuthAuthorizer(_TokenCache):
    """Bearer tokens from ``POST /v2/auth/token`` (client credentials, private_key_jwt)."""

    def __init__(self, *, settings: RedoxSettings, transport: Transport) -> None:
        if not settings.client_id or not settings.keys:
            raise RedoxConfigError(
                "OAuth needs REDOX_CLIENT_ID, REDOX_KID and REDOX_PRIVATE_KEY or REDOX_PRIVATE_KEY_FILE"
            )
        self._client_id = settings.client_id
        self._token_url = settings.token_url
        self._keys = list(settings.keys)
        self._active = 0
        self._transport = transport
        self._token: _CachedToken | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    def __repr__(self) -> str:
        return f"OAuthAuthorizer(client_id={self._client_id!r}, active_kid={self.active_kid!r})"

    @property
    def active_kid(self) -> str:
        return self._keys[self._active].kid

    async def _obtain(self) -> _CachedToken:
        last_error: RedoxAuthError | None = None
        for offset in range(len(self._keys)):
            index = (self._active + offset) % len(self._keys)
            key = self._keys[index]
            form = {
                "grant_type": "client_credentials",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": client_assertion(
                    client_id=self._client_id, audience=self._token_url, key=key
                ),
            }
            try:
                reply = await self._transport.send(
                    surface="auth",
                    method="POST",
                    url=self._token_url,
                    endpoint="POST /v2/auth/token",
                    form=form,
                )
            except RedoxAuthError as exc:
                last_error = exc
                if _KEY_NOT_FOUND in exc.server_text.lower() and offset + 1 < len(self._keys):
                    log.warning("Redox does not know kid %s; trying the next configured key", key.kid)
                    continue
                raise
            if index != self._active:
                log.warning(
                    "kid %s accepted after kid %s was refused; it is now the active key",
                    key.kid,
                    self.active_kid,
                )
                self._active = index
            self.fetches += 1
            return _token_from(reply.json, endpoint="POST /v2/auth/token")
        assert last_error is not None
        raise last_error


def _token_from(data: Any, *, endpoint: str) -> _CachedToken:
    if not isinstance(data, dict) or not data.get("access_token"):
        raise RedoxAuthError(
            status=200, server_text="no access_token in the token response", endpoint=endpoint
        )
    token_type = str(data.get("token_type") or "Bearer")
    lifetime = float(data.get("expires_in") or ASSERTION_LIFETIME_S)
    return _CachedToken(f"{token_type.capitalize()} {data['access_token']}", lifetime)


class LegacyAuthorizer(_TokenCache):
    """Legacy API key + secret (``/auth/authenticate``), refreshed with ``/auth/refreshToken``.

    Redox deprecates these keys in favour of OAuth; they remain for Data Model destinations that
    still use them.
    """

    def __init__(self, *, settings: RedoxSettings, transport: Transport) -> None:
        if settings.api_key is None or settings.api_secret is None:
            raise RedoxConfigError(
                "legacy auth needs REDOX_API_KEY and REDOX_API_SECRET; or use OAuth (REDOX_DATAMODEL_AUTH=oauth)"
            )
        self._api_key = settings.api_key
        self._api_secret = settings.api_secret
        self._auth_url = settings.legacy_auth_url
        self._refresh_url = settings.legacy_refresh_url
        self._transport = transport
        self._token: _CachedToken | None = None
        self._refresh_token: str | None = None
        self._lock = asyncio.Lock()
        self.authentications = 0
        self.refreshes = 0

    def __repr__(self) -> str:
        return "LegacyAuthorizer(api_key=<hidden>)"

    async def _obtain(self) -> _CachedToken:
        if self._refresh_token is not None:
            try:
                reply = await self._transport.send(
                    surface="auth",
                    method="POST",
                    url=self._refresh_url,
                    endpoint="POST /auth/refreshToken",
                    body={"apiKey": self._api_key.get_secret_value(), "refreshToken": self._refresh_token},
                )
                self.refreshes += 1
                return self._accept(reply.json, endpoint="POST /auth/refreshToken")
            except RedoxAuthError:
                log.info("legacy refresh token refused; authenticating with the API key again")
                self._refresh_token = None
        reply = await self._transport.send(
            surface="auth",
            method="POST",
            url=self._auth_url,
            endpoint="POST /auth/authenticate",
            body={"apiKey": self._api_key.get_secret_value(), "secret": self._api_secret.get_secret_value()},
        )
        self.authentications += 1
        return self._accept(reply.json, endpoint="POST /auth/authenticate")

    def _accept(self, data: Any, *, endpoint: str) -> _CachedToken:
        if not isinstance(data, dict) or not data.get("accessToken"):
            raise RedoxAuthError(status=200, server_text="no accessToken in the response", endpoint=endpoint)
        self._refresh_token = data.get("refreshToken") or self._refresh_token
        return _CachedToken(f"Bearer {data['accessToken']}", _lifetime(data.get("expires")))


def _lifetime(expires: Any) -> float:
    """Seconds until ``expires``, which Redox sends as an ISO timestamp (seconds also accepted)."""
    if isinstance(expires, int | float):
        # A big number is an epoch time in seconds or ms, a small one a lifetime.
        if expires > 1e12:
            return max(1.0, expires / 1000 - time.time())
        if expires > 1e9:
            return max(1.0, expires - time.time())
        return max(1.0, float(expires))
    if isinstance(expires, str):
        try:
            moment = datetime.fromisoformat(expires.replace("Z", "+00:00"))
        except ValueError:
            return ASSERTION_LIFETIME_S
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return max(1.0, (moment - datetime.now(UTC)).total_seconds())
    # Documented as 24 h; when the server says nothing, assume the short OAuth life to stay safe.
    return ASSERTION_LIFETIME_S
