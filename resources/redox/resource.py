"""``RedoxResource``: the Dagster resource that hands assets a configured ``RedoxClient``.

Invariant: the resource holds settings only (no client, no business rules). Secrets are never
Dagster config: they come from the environment (or the sandbox's 0600 credentials file) when the
client is built, so they never show in the Dagster UI or run storage.
"""

from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from resources.redox.client import RedoxClient
from resources.redox.settings import RateSpec, RedoxSettings


class RedoxResource(ConfigurableResource):
    """Redox connection settings; ``async with redox.client(run_id=context.run_id) as client:``.

    Every field is optional: unset means "use the REDOX_* environment variable" (see .env.example).
    """

    base_url: str | None = Field(default=None, description="Overrides REDOX_BASE_URL.")
    fhir_org: str | None = Field(default=None, description="Overrides REDOX_FHIR_ORG.")
    environment: str | None = Field(
        default=None, description="Overrides REDOX_ENVIRONMENT (Development|Staging|Production)."
    )
    rate_limit: str | None = Field(default=None, description="Overrides REDOX_RATE_LIMIT, e.g. '7500/300'.")
    rate_margin: float | None = Field(default=None, description="Overrides REDOX_RATE_MARGIN.")
    max_in_flight: int | None = Field(default=None, description="Overrides REDOX_MAX_IN_FLIGHT.")
    budget_path: str | None = Field(default=None, description="Overrides REDOX_BUDGET_PATH.")

    def settings(self) -> RedoxSettings:
        overrides: dict[str, Any] = {}
        if self.base_url:
            overrides["base_url"] = self.base_url.rstrip("/")
        if self.fhir_org:
            overrides["fhir_org"] = self.fhir_org
        if self.environment:
            overrides["environment"] = self.environment
        if self.rate_limit:
            overrides["rate_limit"] = RateSpec.parse(self.rate_limit)
        if self.rate_margin is not None:
            overrides["rate_margin"] = self.rate_margin
        if self.max_in_flight is not None:
            overrides["max_in_flight"] = self.max_in_flight
        if self.budget_path:
            overrides["budget_path"] = self.budget_path
        return RedoxSettings.from_env(**overrides)

    def client(self, *, run_id: str | None = None) -> RedoxClient:
        """A new client (use it as ``async with``); its audit rows carry ``run_id``."""
        return RedoxClient(self.settings(), run_id=run_id)
