"""Every environment variable redox-etl reads, in one pydantic-settings model: ``Settings``.

This module is the only place that reads the process environment for configuration. Each field
names its variable (``validation_alias``), its type, its default and what it is for; .env.example
lists the same variables (tests/unit/test_settings.py keeps the two in step). Everything the project
writes lives under ``REDOX_ETL_HOME`` (default ``./.redox-etl``), so one variable moves or isolates a
whole deployment, and a test isolates itself by pointing it at a temp folder.

Invariants:
- a secret (private keys, the legacy API key and secret, URLs or conninfo that may carry a password)
  is a ``SecretStr``: it never shows in ``repr``, logs, Dagster metadata or error messages;
- a validation error names the variable and the fix in one line and never quotes the value
  (``SettingsError``);
- an empty variable counts as unset, as it did when the variables were read by hand.
"""

import datetime as dt
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

Environment = Literal["Development", "Staging", "Production"]
DatamodelAuth = Literal["auto", "oauth", "legacy"]
BudgetBackend = Literal["sqlite", "redis", "postgres"]

# When set, Settings reads this mapping instead of os.environ: tests and callers that hold their own
# variables get the same parsing without touching the process environment.
_ENVIRONMENT: ContextVar[Mapping[str, str] | None] = ContextVar("redox_etl_environment", default=None)


class SettingsError(ValueError):
    """A variable is missing or malformed; the message names it and says how to fix it."""


class _MappingSource(EnvSettingsSource):
    """The environment source, reading a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environment: Mapping[str, str]) -> None:
        self._environment = environment
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            name if self.case_sensitive else name.lower(): value
            for name, value in self._environment.items()
            if not (self.env_ignore_empty and value == "")
        }


class Settings(BaseSettings):
    """redox-etl's configuration. Build it with ``Settings.from_env()``; see .env.example."""

    model_config = SettingsConfigDict(
        case_sensitive=True,
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
    )

    # --- Where local state lives ---------------------------------------------------------------
    etl_home: Path = Field(
        default=Path(".redox-etl"),
        validation_alias="REDOX_ETL_HOME",
        description="One folder for sandbox credentials, the rate budget, the landing zone and the lake.",
    )
    etl_lake: Path | None = Field(
        default=None,
        validation_alias="REDOX_ETL_LAKE",
        description="The DuckLake location (catalog, Parquet files, raw landing zone); "
        "default $REDOX_ETL_HOME/lake.",
    )
    start_date: dt.date = Field(
        default=dt.date(2025, 1, 1),
        validation_alias="REDOX_ETL_START_DATE",
        description="The first clinical day the daily partitions cover (YYYY-MM-DD).",
    )
    sandbox_credentials: Path | None = Field(
        default=None,
        validation_alias="REDOX_SANDBOX_CREDENTIALS",
        description="Sandbox credentials to use when REDOX_BASE_URL is unset "
        "(default: $REDOX_ETL_HOME/sandbox/credentials.json).",
    )
    dagster_home: Path | None = Field(
        default=None,
        validation_alias="DAGSTER_HOME",
        description="The persistent Dagster instance that the CLI and `make ui` share "
        "(default: $REDOX_ETL_HOME/dagster).",
    )

    # --- The warehouse -------------------------------------------------------------------------
    lake_catalog: SecretStr | None = Field(
        default=None,
        validation_alias="REDOX_LAKE_CATALOG",
        description="sqlite (default, <lake>/catalog.sqlite), sqlite:<path>, or postgres:<libpq conninfo> "
        "for a catalog shared by several machines (treated as a secret: a conninfo may hold a password).",
    )
    lake_data_path: str | None = Field(
        default=None,
        validation_alias="REDOX_LAKE_DATA_PATH",
        description="Where the Parquet data files go (a folder or s3://...); default <lake>/data. "
        "Only read when the catalog is created; a Postgres catalog needs it.",
    )

    # --- Object storage for the lake's data files (DuckDB httpfs; docs/operations.md) -------------
    s3_endpoint: str | None = Field(
        default=None,
        validation_alias="REDOX_S3_ENDPOINT",
        description="host:port of an S3-compatible service (MinIO, Ceph, R2, ...); unset = AWS S3.",
    )
    s3_region: str = Field(
        default="us-east-1",
        validation_alias="REDOX_S3_REGION",
        description="The bucket's region.",
    )
    s3_access_key_id: str | None = Field(
        default=None,
        validation_alias="REDOX_S3_ACCESS_KEY_ID",
        description="The access key id for the bucket that holds REDOX_LAKE_DATA_PATH.",
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None,
        validation_alias="REDOX_S3_SECRET_ACCESS_KEY",
        description="The secret key for that access key id (treated as a secret).",
    )
    s3_session_token: SecretStr | None = Field(
        default=None,
        validation_alias="REDOX_S3_SESSION_TOKEN",
        description="A session token, for temporary credentials (treated as a secret).",
    )
    s3_url_style: Literal["path", "vhost"] = Field(
        default="path",
        validation_alias="REDOX_S3_URL_STYLE",
        description="path (endpoint/bucket/key: what most S3-compatible servers need) or vhost "
        "(bucket.endpoint/key).",
    )
    s3_use_ssl: bool = Field(
        default=True,
        validation_alias="REDOX_S3_USE_SSL",
        description="HTTPS to the endpoint; false only for a server on a private network or loopback.",
    )

    # --- Running steps on several machines (docs/operations.md "Deploying past one machine") ----
    executor: Literal["in_process", "celery"] = Field(
        default="in_process",
        validation_alias="REDOX_ETL_EXECUTOR",
        description="in_process (one machine: a run's steps in the run's process) or celery (steps on "
        "Celery workers: uv sync --frozen --extra distributed).",
    )
    dagster_postgres_url: SecretStr | None = Field(
        default=None,
        validation_alias="DAGSTER_POSTGRES_URL",
        description="Read by deploy/dagster.yaml, not by redox-etl: the Postgres database that holds the "
        "shared Dagster instance (runs, events, schedules, pool slots); treated as a secret.",
    )
    celery_broker: SecretStr | None = Field(
        default=None,
        validation_alias="REDOX_CELERY_BROKER",
        description="For celery: the broker URL, e.g. redis://queue.internal:6379/1 (treated as a secret).",
    )
    celery_backend: SecretStr | None = Field(
        default=None,
        validation_alias="REDOX_CELERY_BACKEND",
        description="For celery: the result backend URL; default the broker (treated as a secret).",
    )
    celery_visibility_timeout: int = Field(
        default=3600,
        ge=10,
        validation_alias="REDOX_CELERY_VISIBILITY_TIMEOUT",
        description="Seconds after which a step whose worker died unacknowledged is handed to another "
        "worker; keep it above the longest step.",
    )

    # --- Which Redox ---------------------------------------------------------------------------
    base_url: str | None = Field(
        default=None,
        validation_alias="REDOX_BASE_URL",
        description="https://api.redoxengine.com (Canada: https://api.ca.redoxengine.com). "
        "Unset = local sandbox.",
    )
    fhir_org: str | None = Field(
        default=None,
        validation_alias="REDOX_FHIR_ORG",
        description="FHIR destination slug, the {org} in /fhir/R4/{org}/{environment}/... "
        "(unset: the sandbox's, or 'org').",
    )
    environment: Environment | None = Field(
        default=None,
        validation_alias="REDOX_ENVIRONMENT",
        description="Development | Staging | Production (also sets Meta.Test=false only for Production). "
        "Unset: the sandbox's, or Development.",
    )

    # --- OAuth API key (client credentials with a signed JWT; Redox's recommended method) -------
    client_id: str | None = Field(
        default=None,
        validation_alias="REDOX_CLIENT_ID",
        description="The client id from the Redox dashboard (the JWT's iss and sub).",
    )
    kid: str | None = Field(
        default=None,
        validation_alias="REDOX_KID",
        description="The kid of the active signing key, as registered in the dashboard or your JWKS.",
    )
    private_key: SecretStr | None = Field(
        default=None,
        validation_alias="REDOX_PRIVATE_KEY",
        description="The private key itself (PEM, RSA for RS384 or P-384 EC for ES384). "
        "Prefer the file form.",
    )
    private_key_file: Path | None = Field(
        default=None,
        validation_alias="REDOX_PRIVATE_KEY_FILE",
        description="A file (mode 0600 or stricter, else refused) holding one PEM key (named by REDOX_KID), "
        'one private JWK, a JWK set {"keys": [...]} or a JSON object {kid: pem}. With several keys, '
        'REDOX_KID goes first and the others are tried in order when Redox answers "Public key not found".',
    )
    next_kid: str | None = Field(
        default=None,
        validation_alias="REDOX_NEXT_KID",
        description="The kid of the key you are rotating to.",
    )
    next_private_key: SecretStr | None = Field(
        default=None,
        validation_alias="REDOX_NEXT_PRIVATE_KEY",
        description="The key you are rotating to: used when the active kid is refused.",
    )
    next_private_key_file: Path | None = Field(
        default=None,
        validation_alias="REDOX_NEXT_PRIVATE_KEY_FILE",
        description="The key you are rotating to, as a file (same forms and permissions as "
        "REDOX_PRIVATE_KEY_FILE).",
    )

    # --- Data Model API ------------------------------------------------------------------------
    source_id: str | None = Field(
        default=None,
        validation_alias="REDOX_SOURCE_ID",
        description="Meta.Source.ID (needed only with several OAuth keys per environment type).",
    )
    destination_id_patientsearch: str | None = Field(
        default=None,
        validation_alias="REDOX_DESTINATION_ID_PATIENTSEARCH",
        description="Meta.Destinations[0].ID for PatientSearch queries.",
    )
    destination_id_scheduling: str | None = Field(
        default=None,
        validation_alias="REDOX_DESTINATION_ID_SCHEDULING",
        description="Meta.Destinations[0].ID for Scheduling queries.",
    )
    destination_id_results: str | None = Field(
        default=None,
        validation_alias="REDOX_DESTINATION_ID_RESULTS",
        description="Meta.Destinations[0].ID for Results queries.",
    )
    destination_id_patientadmin: str | None = Field(
        default=None,
        validation_alias="REDOX_DESTINATION_ID_PATIENTADMIN",
        description="Meta.Destinations[0].ID for PatientAdmin queries.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        validation_alias="REDOX_API_KEY",
        description="Legacy (deprecated) API key, for Data Model destinations that still use it.",
    )
    api_secret: SecretStr | None = Field(
        default=None,
        validation_alias="REDOX_API_SECRET",
        description="Legacy (deprecated) API secret, with REDOX_API_KEY.",
    )
    datamodel_auth: DatamodelAuth = Field(
        default="auto",
        validation_alias="REDOX_DATAMODEL_AUTH",
        description="auto | oauth | legacy. auto = OAuth when a signing key is configured, "
        "else the legacy key.",
    )

    # --- The shared rate budget (one per Redox host, for every process on this machine) ---------
    rate_limit: str = Field(
        default="7500/300",
        validation_alias="REDOX_RATE_LIMIT",
        description="Redox's limit per egress IP: requests/seconds over a rolling window.",
    )
    rate_margin: float = Field(
        default=0.97,
        gt=0,
        le=1,
        validation_alias="REDOX_RATE_MARGIN",
        description="Spend at most this fraction of the limit (room for clock jitter and other clients).",
    )
    rate_limit_fhir: str | None = Field(
        default=None,
        validation_alias="REDOX_RATE_LIMIT_FHIR",
        description="Optional stricter sub-limit for the FHIR API, e.g. 1500/300.",
    )
    rate_limit_patientsearch: str | None = Field(
        default=None,
        validation_alias="REDOX_RATE_LIMIT_PATIENTSEARCH",
        description="Optional stricter sub-limit for PatientSearch queries.",
    )
    rate_limit_scheduling: str | None = Field(
        default=None,
        validation_alias="REDOX_RATE_LIMIT_SCHEDULING",
        description="Optional stricter sub-limit for Scheduling queries.",
    )
    rate_limit_results: str | None = Field(
        default=None,
        validation_alias="REDOX_RATE_LIMIT_RESULTS",
        description="Optional stricter sub-limit for Results queries.",
    )
    rate_limit_patientadmin: str | None = Field(
        default=None,
        validation_alias="REDOX_RATE_LIMIT_PATIENTADMIN",
        description="Optional stricter sub-limit for PatientAdmin queries.",
    )
    budget_backend: BudgetBackend = Field(
        default="sqlite",
        validation_alias="REDOX_BUDGET_BACKEND",
        description="sqlite (one machine) | redis | postgres (several machines). A URL alone also works "
        "here. redis and postgres need their client libraries: uv sync --frozen --extra redis "
        "(or --extra postgres).",
    )
    budget_path: Path | None = Field(
        default=None,
        validation_alias="REDOX_BUDGET_PATH",
        description="The SQLite file every local process shares (default: $REDOX_ETL_HOME/budget.sqlite).",
    )
    budget_url: SecretStr | None = Field(
        default=None,
        validation_alias="REDOX_BUDGET_URL",
        description="For redis/postgres: redis://host:6379/0 or postgresql://user:pass@host/db "
        "(treated as a secret).",
    )

    # --- Client tuning -------------------------------------------------------------------------
    max_in_flight: int = Field(
        default=256,
        ge=1,
        validation_alias="REDOX_MAX_IN_FLIGHT",
        description="Most requests in flight per client (one per asset step). The client keeps about "
        "rate limit per second x observed latency x 1.5 in flight (at least 4), so the budget, not "
        "the latency, sets the pace; this caps it and the connection pool.",
    )
    connect_timeout: float = Field(
        default=10.0,
        gt=0,
        validation_alias="REDOX_CONNECT_TIMEOUT",
        description="Seconds to connect.",
    )
    read_timeout: float = Field(
        default=130.0,
        gt=0,
        validation_alias="REDOX_READ_TIMEOUT",
        description='Seconds to read. Redox answers 504 after "a couple of minutes", so this stays above 120.',
    )
    retry_attempts: int = Field(
        default=8,
        ge=1,
        validation_alias="REDOX_RETRY_ATTEMPTS",
        description="Attempts per request for 5xx, timeouts, dropped connections and 429s.",
    )
    retry_timeout: float = Field(
        default=300.0,
        gt=0,
        validation_alias="REDOX_RETRY_TIMEOUT",
        description="Total seconds of retrying per request.",
    )
    fhir_batch_size: int = Field(
        default=50,
        ge=1,
        validation_alias="REDOX_FHIR_BATCH_SIZE",
        description="Patient ids per comma-separated FHIR search (also bounded to ~1800 characters).",
    )
    fhir_page_size: int = Field(
        default=200,
        ge=1,
        validation_alias="REDOX_FHIR_PAGE_SIZE",
        description="FHIR _count: entries asked for per search page (a server may send fewer; the "
        "sandbox clamps to 1000). Larger pages spend fewer requests but take longer each.",
    )
    fhir_day_slices: int = Field(
        default=4,
        ge=1,
        le=96,
        validation_alias="REDOX_FHIR_DAY_SLICES",
        description="Most disjoint time windows a busy day's FHIR search is cut into, searched at "
        "once (one per 8 pages a neighbouring landed day held): a search's pages follow one another, "
        "so a busy day's paging is that many chains, not one.",
    )

    # --- The push lane (webhook receiver and inbox) ----------------------------------------------
    webhook_tokens: SecretStr | None = Field(
        default=None,
        validation_alias="REDOX_WEBHOOK_TOKENS",
        description="Verification tokens a Redox delivery may carry, comma-separated (several while "
        "rotating); a secret.",
    )
    webhook_token_file: Path | None = Field(
        default=None,
        validation_alias="REDOX_WEBHOOK_TOKEN_FILE",
        description="A 0600 file with one verification token per line (read instead of, or beside, "
        "REDOX_WEBHOOK_TOKENS; re-read on each delivery, so a rotation needs no restart).",
    )
    webhook_inbox: Path | None = Field(
        default=None,
        validation_alias="REDOX_WEBHOOK_INBOX",
        description="The durable inbox (SQLite, WAL, fsync before each 200); "
        "default $REDOX_ETL_HOME/inbox/inbox.sqlite.",
    )
    webhook_max_body: int = Field(
        default=10_000_000,
        ge=1,
        validation_alias="REDOX_WEBHOOK_MAX_BODY",
        description="Largest delivery body accepted, in bytes; larger ones get 413 (Redox's own limit "
        "for non-upload payloads is 10 MB).",
    )
    webhook_retention_days: int = Field(
        default=30,
        ge=1,
        validation_alias="REDOX_WEBHOOK_RETENTION_DAYS",
        description="Days a loaded delivery stays in the inbox for replay; older ones are pruned.",
    )
    webhook_load_interval: int = Field(
        default=15,
        ge=1,
        validation_alias="REDOX_WEBHOOK_LOAD_INTERVAL",
        description="Seconds between checks of the inbox by the Dagster sensor push_inbox.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environment = _ENVIRONMENT.get()
        if environment is None:
            return (init_settings, env_settings)
        return (init_settings, _MappingSource(settings_cls, environment))

    @classmethod
    def from_env(cls, environment: Mapping[str, str] | None = None) -> "Settings":
        """The settings from ``os.environ``, or from ``environment`` alone when given."""
        return cls._build(environment, {})

    def updated(self, **changes: Any) -> "Settings":
        """A validated copy with some fields (by field name) replaced, e.g. a resource's overrides."""
        values = {
            info.validation_alias: getattr(self, name)
            for name, info in type(self).model_fields.items()
            if name in self.model_fields_set
        }
        values.update({type(self).model_fields[name].validation_alias: v for name, v in changes.items()})
        return type(self)._build({}, values)

    @classmethod
    def _build(cls, environment: Mapping[str, str] | None, values: dict[Any, Any]) -> "Settings":
        token = _ENVIRONMENT.set(environment)
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError(explain(exc)) from None
        finally:
            _ENVIRONMENT.reset(token)

    @model_validator(mode="before")
    @classmethod
    def _budget_url_in_backend(cls, data: Any) -> Any:
        # REDOX_BUDGET_BACKEND=redis://... is allowed: a URL alone says which backend it is. It is
        # moved to REDOX_BUDGET_URL before validation so the password in it is held as a secret.
        backend = data.get("REDOX_BUDGET_BACKEND") if isinstance(data, dict) else None
        if isinstance(backend, str) and "://" in backend:
            data = {**data, "REDOX_BUDGET_BACKEND": backend.split("://", 1)[0], "REDOX_BUDGET_URL": backend}
        return data

    @field_validator("budget_backend", mode="before")
    @classmethod
    def _backend_alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return {"postgresql": "postgres", "rediss": "redis"}.get(value, value)
        return value

    @field_validator("datamodel_auth", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("base_url", mode="after")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    # --- Derived locations ---------------------------------------------------------------------
    @property
    def home(self) -> Path:
        """The state folder, resolved (``home()`` also creates it)."""
        return self.etl_home.resolve()

    @property
    def lake(self) -> Path:
        """The DuckLake folder: catalog, Parquet data files and the raw landing zone."""
        return (self.etl_lake or self.home / "lake").resolve()

    @property
    def budget_file(self) -> Path:
        """The SQLite file that holds the rate budget every local process shares."""
        return (self.budget_path or self.home / "budget.sqlite").resolve()

    @property
    def sandbox_state(self) -> Path:
        """Where `redox-etl sandbox serve` writes credentials.json unless --state-dir says otherwise."""
        return self.home / "sandbox"

    @property
    def sandbox_credentials_file(self) -> Path:
        return self.sandbox_credentials or self.sandbox_state / "credentials.json"

    @property
    def inbox_file(self) -> Path:
        """The push lane's durable inbox (SQLite)."""
        return (self.webhook_inbox or self.home / "inbox" / "inbox.sqlite").resolve()

    @property
    def dagster_dir(self) -> Path:
        return (self.dagster_home or self.home / "dagster").resolve()

    def destination_ids(self) -> dict[str, str]:
        """Meta.Destinations[0].ID per data model that has one, keyed by lower-case model name."""
        return _by_suffix(self, "destination_id_")

    def rate_sub_limits(self) -> dict[str, str]:
        """``{destination: "<requests>/<seconds>"}`` for the destinations with a stricter limit."""
        return _by_suffix(self, "rate_limit_")


def _by_suffix(settings: Settings, prefix: str) -> dict[str, str]:
    return {
        name.removeprefix(prefix): value
        for name in type(settings).model_fields
        if name.startswith(prefix) and (value := getattr(settings, name))
    }


def variables() -> Iterator[tuple[str, FieldInfo]]:
    """``(VARIABLE_NAME, field)`` for every variable the project reads, in declaration order."""
    for info in Settings.model_fields.values():
        yield str(info.validation_alias), info


def explain(exc: ValidationError) -> str:
    """One line per bad variable: its name, what is wrong, and the fix. Never the value."""
    lines = []
    fields = {str(info.validation_alias): info for _, info in variables()}
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        info = fields.get(name)
        default = "" if info is None or info.default is None else f" (default {info.default})"
        lines.append(
            f"{name}: {error['msg']}. Fix: set {name} as .env.example describes, or unset it{default}."
        )
    return "\n".join(lines)


def home() -> Path:
    """The state folder, created on first use with owner-only permissions (it holds credentials)."""
    return _created_home(Settings.from_env())


def sandbox_dir() -> Path:
    """Where `redox-etl sandbox serve` writes credentials.json unless --state-dir says otherwise."""
    return _created_home(Settings.from_env()) / "sandbox"


def lake_dir() -> Path:
    """The default DuckLake location: catalog, Parquet data files and the raw landing zone."""
    settings = Settings.from_env()
    _created_home(settings)
    return settings.lake


def budget_path() -> Path:
    """The SQLite file that holds the rate budget every local process shares."""
    settings = Settings.from_env()
    _created_home(settings)
    return settings.budget_file


def dagster_home() -> Path:
    """The persistent Dagster instance folder (DAGSTER_HOME, default $REDOX_ETL_HOME/dagster)."""
    settings = Settings.from_env()
    _created_home(settings)
    return settings.dagster_dir


def _created_home(settings: Settings) -> Path:
    path = settings.home
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path
