"""``RedoxResource``: the Dagster resource that hands assets a configured ``RedoxClient``.

Invariant: the resource holds settings only (no client, no business rules). Its fields are the
Redox fields of ``resources.settings.Settings`` under the same names; ``resources.all_resources``
binds the ones the environment sets, so the Dagster UI shows them. Secrets are never Dagster config
values: they are bound as ``dg.EnvVar`` (Dagster stores the variable's name, not its value) or left
unset. An unset field takes the environment's value through ``Settings`` when the client is built,
so a bare ``RedoxResource()`` in a script or test behaves like the configured one.
"""

from typing import Any, Final

from dagster import ConfigurableResource, EnvVar
from pydantic import Field

from resources.redox.client import RedoxClient
from resources.redox.errors import RedoxConfigError
from resources.redox.settings import RedoxSettings
from resources.settings import Settings, SettingsError

# Settings fields whose values may hold a secret: bound only as dg.EnvVar, never by value.
SECRET_FIELDS: Final = ("private_key", "next_private_key", "api_key", "api_secret", "budget_url")


def _described(name: str) -> Any:
    """An optional field documented by the Settings field of the same name (one description)."""
    info = Settings.model_fields[name]
    return Field(default=None, description=f"{info.validation_alias}: {info.description}")


class RedoxResource(ConfigurableResource):
    """Redox connection settings; ``async with redox.client(run_id=context.run_id) as client:``.

    Every field is optional: unset means "the REDOX_* environment variable" (see .env.example).
    """

    base_url: str | None = _described("base_url")
    sandbox_credentials: str | None = _described("sandbox_credentials")
    fhir_org: str | None = _described("fhir_org")
    environment: str | None = _described("environment")
    client_id: str | None = _described("client_id")
    kid: str | None = _described("kid")
    private_key: str | None = _described("private_key")
    private_key_file: str | None = _described("private_key_file")
    next_kid: str | None = _described("next_kid")
    next_private_key: str | None = _described("next_private_key")
    next_private_key_file: str | None = _described("next_private_key_file")
    source_id: str | None = _described("source_id")
    destination_id_patientsearch: str | None = _described("destination_id_patientsearch")
    destination_id_scheduling: str | None = _described("destination_id_scheduling")
    destination_id_results: str | None = _described("destination_id_results")
    destination_id_patientadmin: str | None = _described("destination_id_patientadmin")
    api_key: str | None = _described("api_key")
    api_secret: str | None = _described("api_secret")
    datamodel_auth: str | None = _described("datamodel_auth")
    rate_limit: str | None = _described("rate_limit")
    rate_margin: float | None = _described("rate_margin")
    rate_limit_fhir: str | None = _described("rate_limit_fhir")
    rate_limit_patientsearch: str | None = _described("rate_limit_patientsearch")
    rate_limit_scheduling: str | None = _described("rate_limit_scheduling")
    rate_limit_results: str | None = _described("rate_limit_results")
    rate_limit_patientadmin: str | None = _described("rate_limit_patientadmin")
    budget_backend: str | None = _described("budget_backend")
    budget_path: str | None = _described("budget_path")
    budget_url: str | None = _described("budget_url")
    max_in_flight: int | None = _described("max_in_flight")
    connect_timeout: float | None = _described("connect_timeout")
    read_timeout: float | None = _described("read_timeout")
    retry_attempts: int | None = _described("retry_attempts")
    retry_timeout: float | None = _described("retry_timeout")
    fhir_batch_size: int | None = _described("fhir_batch_size")
    fhir_page_size: int | None = _described("fhir_page_size")
    fhir_day_slices: int | None = _described("fhir_day_slices")

    @classmethod
    def from_settings(cls, settings: Settings) -> "RedoxResource":
        """The resource with every Redox value ``settings`` sets bound (secrets by variable name)."""
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            if name not in settings.model_fields_set:
                continue
            if name == "budget_url":
                # It may have come from REDOX_BUDGET_BACKEND (a URL alone names its backend), so
                # no single variable is known to hold it: it is read through Settings at use.
                continue
            if name in SECRET_FIELDS:
                values[name] = EnvVar(str(Settings.model_fields[name].validation_alias))
            else:
                value = getattr(settings, name)
                values[name] = value if isinstance(value, int | float) else str(value)
        return cls(**values)

    def settings(self) -> RedoxSettings:
        changes = {name: getattr(self, name) for name in type(self).model_fields}
        # An EnvVar still unresolved means Dagster did not build this resource (a script called it
        # directly); the variable is then read through Settings like any unset field.
        changes = {k: v for k, v in changes.items() if v is not None and not isinstance(v, EnvVar)}
        try:
            settings = Settings.from_env().updated(**changes)
        except SettingsError as exc:
            raise RedoxConfigError(str(exc)) from None
        return RedoxSettings.from_settings(settings)

    def client(self, *, run_id: str | None = None) -> RedoxClient:
        """A new client (use it as ``async with``); its audit rows carry ``run_id``."""
        return RedoxClient(self.settings(), run_id=run_id)
