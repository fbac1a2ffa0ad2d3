"""``RedoxClient``: one async client for both Redox surfaces, used as an async context manager.

Invariant: one client = one HTTP connection pool, one in-flight bound, one token cache and one audit
trail; every client on the machine (any process, any run) draws from the same rate budget for its
host, because the budget lives in the shared store named by the settings.
"""

from types import TracebackType

import httpx
import polars as pl

from resources.redox.audit import AuditLog
from resources.redox.auth import LegacyAuthorizer, OAuthAuthorizer
from resources.redox.budget import RateBudget
from resources.redox.datamodel import DataModelClient
from resources.redox.fhir import FhirClient
from resources.redox.inflight import InFlightStats
from resources.redox.settings import RedoxSettings
from resources.redox.transport import Authorizer, Transport


class RedoxClient:
    """FHIR searches (``client.fhir``), Data Model queries (``client.datamodel``) and the audit trail.

    ``async with RedoxClient(settings, run_id=...) as client:``. A ``budget`` may be shared between
    clients in one process; otherwise the client opens (and closes) its own handle on the shared
    store.
    """

    def __init__(
        self,
        settings: RedoxSettings | None = None,
        *,
        run_id: str | None = None,
        budget: RateBudget | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings or RedoxSettings.from_env()
        self.run_id = run_id
        self.audit = AuditLog(run_id=run_id)
        self._owns_budget = budget is None
        self.budget = budget or RateBudget.from_settings(self.settings)
        self.transport = Transport(settings=self.settings, budget=self.budget, audit=self.audit, http=http)
        self._oauth: OAuthAuthorizer | None = None
        self._legacy: LegacyAuthorizer | None = None
        self.fhir = FhirClient(
            settings=self.settings, transport=self.transport, authorizer=self._lazy("oauth")
        )
        self.datamodel = DataModelClient(
            settings=self.settings,
            transport=self.transport,
            authorizer=self._lazy(self.settings.datamodel_auth),
        )

    def __repr__(self) -> str:
        return f"RedoxClient(host={self.settings.host!r}, run_id={self.run_id!r})"

    def _lazy(self, kind: str) -> Authorizer:
        """Authorizers are built on first use, so a client for one surface needs only its credentials."""
        client = self

        class _Lazy:
            async def authorization(self) -> str:
                return await client.authorizer(kind).authorization()

            async def invalidate(self, value: str) -> None:
                await client.authorizer(kind).invalidate(value)

        return _Lazy()

    def authorizer(self, kind: str) -> OAuthAuthorizer | LegacyAuthorizer:
        if kind == "legacy":
            if self._legacy is None:
                self._legacy = LegacyAuthorizer(settings=self.settings, transport=self.transport)
            return self._legacy
        if self._oauth is None:
            self._oauth = OAuthAuthorizer(settings=self.settings, transport=self.transport)
        return self._oauth

    def in_flight_stats(self) -> InFlightStats:
        """The in-flight bound now (sized to the budget at the observed latency), its use so far and
        the latency estimate: PHI-free numbers fit for logs and Dagster metadata."""
        return self.transport.in_flight_stats()

    def audit_frame(self) -> pl.DataFrame:
        """Every HTTP attempt so far, in the warehouse's ``api_calls`` schema."""
        return self.audit.frame()

    async def aclose(self) -> None:
        await self.transport.aclose()
        if self._owns_budget:
            self.budget.close()

    async def __aenter__(self) -> "RedoxClient":
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
