"""Redox client settings: the connection, keys and limits one client needs, as typed values.

The environment is read once, by ``resources.settings.Settings``; this module turns those raw values
into what the client uses (signing keys from PEMs, JWKs or key files, rate specs, the sandbox's
credentials file when no Redox is configured).

Invariants:
- a secret (private key, legacy API secret, budget URL with a password) is held only as
  ``SecretStr``, so it never shows in ``repr``, logs, Dagster metadata or error messages;
- a private key file, or the sandbox's credentials file, is refused unless only its owner can read it;
- with no ``REDOX_BASE_URL`` the settings point at the local sandbox (its credentials.json), so a fresh
  clone runs end to end and real Redox is only a change of environment.
"""

import json
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from resources import settings as local_state
from resources.redox.errors import RedoxConfigError
from resources.settings import BudgetBackend, Environment, Settings, SettingsError

JwtAlgorithm = Literal["RS384", "ES384"]


class RateSpec(BaseModel):
    """``limit`` requests per rolling ``seconds``; written ``7500/300`` in the environment."""

    model_config = ConfigDict(frozen=True)

    limit: int = Field(gt=0)
    seconds: float = Field(gt=0)

    @classmethod
    def parse(cls, text: str, *, name: str = "REDOX_RATE_LIMIT") -> "RateSpec":
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*s?\s*", text)
        if not match:
            raise RedoxConfigError(f"{name}={text!r}: expected '<requests>/<seconds>', e.g. 7500/300")
        return cls(limit=int(match.group(1)), seconds=float(match.group(2)))

    def __str__(self) -> str:
        return f"{self.limit}/{self.seconds:g}s"


class SigningKey(BaseModel):
    """One client-assertion key. ``kid`` names it in Redox's JWK set; the PEM is never shown."""

    model_config = ConfigDict(frozen=True)

    kid: str
    private_key_pem: SecretStr
    alg: JwtAlgorithm

    @classmethod
    def from_pem(cls, kid: str, pem: str, *, origin: str) -> "SigningKey":
        return cls(kid=kid, private_key_pem=SecretStr(pem), alg=_algorithm_for(pem, origin=origin))

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any], *, origin: str) -> "SigningKey":
        """A private JWK, the form the Redox dashboard hands out when it generates the key pair."""
        import jwt

        kid = jwk.get("kid")
        if not kid:
            raise RedoxConfigError(f"{origin}: a JWK without 'kid'; Redox picks the key by kid")
        try:
            key = jwt.PyJWK(dict(jwk)).key
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()
        except Exception as exc:
            raise RedoxConfigError(
                f"{origin}: JWK kid={kid} is not a usable private key ({type(exc).__name__})"
            ) from None
        return cls.from_pem(str(kid), pem, origin=origin)


def _algorithm_for(pem: str, *, origin: str) -> JwtAlgorithm:
    """Redox accepts RS384 and ES384 client assertions; the key type decides which."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except Exception as exc:
        # The exception text could quote key material; only its type is safe to show.
        raise RedoxConfigError(
            f"{origin}: not a readable unencrypted PEM private key ({type(exc).__name__})"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS384"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        return "ES384"
    raise RedoxConfigError(f"{origin}: Redox needs an RSA key (RS384) or a P-384 EC key (ES384)")


def read_secret_file(path: Path, *, name: str) -> str:
    """Read a file holding secrets, refusing one that group or others can read."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise RedoxConfigError(f"{name}: {path} does not exist") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise RedoxConfigError(
            f"{name}: {path} has mode {stat.S_IMODE(info.st_mode):04o}; a file holding secrets must be "
            f"readable by its owner only. Run: chmod 600 {path}"
        )
    return path.read_text()


def parse_key_file(text: str, *, kid: str | None, origin: str) -> list[SigningKey]:
    """Keys from a file: one PEM (named by ``kid``), one private JWK, a JWK set ``{"keys": [...]}``,
    or a JSON object ``{kid: pem}``. Order is rotation order: the first key is tried first."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        if not kid:
            raise RedoxConfigError(f"{origin}: a PEM key file needs REDOX_KID to name its key")
        return [SigningKey.from_pem(kid, stripped + "\n", origin=origin)]
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError:
        raise RedoxConfigError(f"{origin}: starts with '{{' but is not valid JSON") from None
    if isinstance(data.get("keys"), list):
        keys = [SigningKey.from_jwk(jwk, origin=origin) for jwk in data["keys"]]
    elif "kty" in data:
        keys = [SigningKey.from_jwk(data, origin=origin)]
    else:
        keys = [SigningKey.from_pem(str(k), str(v), origin=origin) for k, v in data.items()]
    if kid:
        # REDOX_KID names the active key; put it first so rotation starts from it.
        keys.sort(key=lambda k: k.kid != kid)
    if not keys:
        raise RedoxConfigError(f"{origin}: no keys found")
    return keys


class RedoxSettings(BaseModel):
    """Everything the client needs to reach one Redox organization and environment."""

    model_config = ConfigDict(frozen=True)

    base_url: str
    client_id: str | None = None
    keys: tuple[SigningKey, ...] = ()
    fhir_org: str = "org"
    environment: Environment = "Development"
    source_id: str | None = None
    destination_ids: dict[str, str] = Field(default_factory=dict)
    api_key: SecretStr | None = None
    api_secret: SecretStr | None = None
    datamodel_auth: Literal["oauth", "legacy"] = "oauth"
    # True when the connection came from the embedded sandbox's credentials file: only then is there
    # a ground truth to measure against (GET /sandbox/truth); real Redox has none.
    sandbox: bool = False

    rate_limit: RateSpec = RateSpec(limit=7500, seconds=300)
    rate_margin: float = Field(default=0.97, gt=0, le=1)
    sub_limits: dict[str, RateSpec] = Field(default_factory=dict)
    budget_backend: BudgetBackend = "sqlite"
    budget_url: SecretStr | None = None
    budget_path: Path = Field(default_factory=local_state.budget_path)

    max_in_flight: int = Field(default=256, ge=1)
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=130.0, gt=0)
    retry_attempts: int = Field(default=8, ge=1)
    retry_timeout: float = Field(default=300.0, gt=0)
    fhir_batch_size: int = Field(default=50, ge=1)
    # None sends no _count (the server's default page).
    fhir_page_size: int | None = Field(default=200, ge=1)
    fhir_day_slices: int = Field(default=4, ge=1, le=96)

    @property
    def host(self) -> str:
        """The budget key: Redox limits per egress IP, and one host is one budget for this machine."""
        parts = urlsplit(self.base_url)
        return parts.netloc or parts.path

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/v2/auth/token"

    @property
    def legacy_auth_url(self) -> str:
        return f"{self.base_url}/auth/authenticate"

    @property
    def legacy_refresh_url(self) -> str:
        return f"{self.base_url}/auth/refreshToken"

    @property
    def fhir_base(self) -> str:
        return f"{self.base_url}/fhir/R4/{self.fhir_org}/{self.environment}"

    @property
    def datamodel_url(self) -> str:
        return f"{self.base_url}/endpoint"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "RedoxSettings":
        """Settings from the environment (or ``env`` alone); with no REDOX_BASE_URL, from the
        sandbox's credentials."""
        try:
            settings = Settings.from_env(env)
        except SettingsError as exc:
            raise RedoxConfigError(str(exc)) from None
        return cls.from_settings(settings, **overrides)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> "RedoxSettings":
        """Settings from the one settings model; with no base URL, from the sandbox's credentials."""
        values: dict[str, Any] = {}
        if settings.base_url:
            values.update(_connection_from_settings(settings))
        else:
            values.update(_connection_from_credentials(settings.sandbox_credentials_file))
            # Explicit variables still win over the sandbox's file, e.g. to test legacy auth.
            values.update({k: v for k, v in _connection_from_settings(settings, partial=True).items() if v})
        values.update(_tuning_from_settings(settings))
        if "base_url" in overrides and overrides["base_url"] != values.get("base_url"):
            values["sandbox"] = False
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_credentials(cls, path: Path | str, **overrides: Any) -> "RedoxSettings":
        """Settings for a sandbox, from the credentials.json it wrote (tests, bench)."""
        values = _connection_from_credentials(Path(path))
        values.update(overrides)
        return cls(**values)


def _connection_from_settings(settings: Settings, *, partial: bool = False) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if settings.base_url:
        values["base_url"] = settings.base_url
    values["client_id"] = settings.client_id
    values["fhir_org"] = settings.fhir_org
    values["environment"] = settings.environment
    values["source_id"] = settings.source_id
    kid = settings.kid
    keys: list[SigningKey] = []
    if settings.private_key:
        if not kid:
            raise RedoxConfigError(
                "REDOX_PRIVATE_KEY is set but REDOX_KID is not; Redox picks the key by kid"
            )
        pem = settings.private_key.get_secret_value()
        keys.append(SigningKey.from_pem(kid, pem, origin="REDOX_PRIVATE_KEY"))
    elif settings.private_key_file:
        text = read_secret_file(settings.private_key_file, name="REDOX_PRIVATE_KEY_FILE")
        keys.extend(parse_key_file(text, kid=kid, origin="REDOX_PRIVATE_KEY_FILE"))
    next_kid = settings.next_kid
    if settings.next_private_key:
        if not next_kid:
            raise RedoxConfigError("REDOX_NEXT_PRIVATE_KEY is set but REDOX_NEXT_KID is not")
        pem = settings.next_private_key.get_secret_value()
        keys.append(SigningKey.from_pem(next_kid, pem, origin="REDOX_NEXT_PRIVATE_KEY"))
    elif settings.next_private_key_file:
        text = read_secret_file(settings.next_private_key_file, name="REDOX_NEXT_PRIVATE_KEY_FILE")
        keys.extend(parse_key_file(text, kid=next_kid, origin="REDOX_NEXT_PRIVATE_KEY_FILE"))
    if keys or not partial:
        values["keys"] = tuple(keys)
    destinations = settings.destination_ids()
    if destinations or not partial:
        values["destination_ids"] = destinations
    values["api_key"] = settings.api_key
    values["api_secret"] = settings.api_secret
    if settings.datamodel_auth == "auto":
        if not partial:
            # OAuth is what Redox recommends; legacy keys are deprecated, so they are the fallback.
            values["datamodel_auth"] = "oauth" if keys else "legacy"
    else:
        values["datamodel_auth"] = settings.datamodel_auth
    return {k: v for k, v in values.items() if v is not None}


def _connection_from_credentials(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise RedoxConfigError(
            f"REDOX_BASE_URL is not set and no sandbox credentials at {path}. Set the REDOX_* variables "
            "(see .env.example) for real Redox, or start the sandbox: redox-etl sandbox serve"
        )
    creds = json.loads(read_secret_file(path, name="sandbox credentials"))
    base = str(creds["base_url"]).rstrip("/")
    values: dict[str, Any] = {"base_url": base, "client_id": creds.get("client_id")}
    if creds.get("fhir_org"):
        values["fhir_org"] = creds["fhir_org"]
    if creds.get("environment"):
        values["environment"] = creds["environment"]
    fhir_base = creds.get("fhir_base")
    if fhir_base:
        # {base}/fhir/R4/{org}/{environment}
        tail = str(fhir_base).removeprefix(base).strip("/").split("/")
        if len(tail) == 4 and tail[:2] == ["fhir", "R4"]:
            values["fhir_org"], values["environment"] = tail[2], tail[3]
    keys = []
    if creds.get("private_key_pem") and creds.get("kid"):
        keys.append(SigningKey.from_pem(creds["kid"], creds["private_key_pem"], origin=str(path)))
    if creds.get("second_private_key_pem") and creds.get("second_kid"):
        keys.append(
            SigningKey.from_pem(creds["second_kid"], creds["second_private_key_pem"], origin=str(path))
        )
    values["keys"] = tuple(keys)
    if creds.get("legacy_api_key"):
        values["api_key"] = SecretStr(creds["legacy_api_key"])
    if creds.get("legacy_secret"):
        values["api_secret"] = SecretStr(creds["legacy_secret"])
    if creds.get("source_id"):
        values["source_id"] = creds["source_id"]
    if isinstance(creds.get("destination_ids"), dict):
        values["destination_ids"] = {str(k).lower(): str(v) for k, v in creds["destination_ids"].items()}
    values["datamodel_auth"] = "oauth" if keys else "legacy"
    values["sandbox"] = True
    return values


def _tuning_from_settings(settings: Settings) -> dict[str, Any]:
    return {
        "rate_limit": RateSpec.parse(settings.rate_limit),
        "sub_limits": {
            name: RateSpec.parse(text, name=f"REDOX_RATE_LIMIT_{name.upper()}")
            for name, text in settings.rate_sub_limits().items()
        },
        "budget_backend": settings.budget_backend,
        "budget_url": settings.budget_url,
        "budget_path": settings.budget_file,
        "rate_margin": settings.rate_margin,
        "max_in_flight": settings.max_in_flight,
        "connect_timeout": settings.connect_timeout,
        "read_timeout": settings.read_timeout,
        "retry_attempts": settings.retry_attempts,
        "retry_timeout": settings.retry_timeout,
        "fhir_batch_size": settings.fhir_batch_size,
        "fhir_page_size": settings.fhir_page_size,
        "fhir_day_slices": settings.fhir_day_slices,
    }
