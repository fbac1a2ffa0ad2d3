"""The Redox client: auth, one shared rate budget, retries, paging and an audit trail, for both the
FHIR R4 and the Data Model surfaces. Assets use ``RedoxResource.client(run_id=...)``, imported from
``resources.redox.resource``: this package does not export it, so worker processes that only need
the client (benchmarks, scripts) do not pay for importing Dagster.
"""

from resources.redox.audit import AuditLog
from resources.redox.budget import RateBudget
from resources.redox.client import RedoxClient
from resources.redox.datamodel import DataModelClient, DataModelReply
from resources.redox.errors import (
    PageTotalMismatch,
    RedoxAuthError,
    RedoxConfigError,
    RedoxConnectionError,
    RedoxDataModelError,
    RedoxError,
    RedoxRateLimited,
    RedoxRequestError,
    RedoxServerError,
)
from resources.redox.fhir import FhirClient, Page, date_window
from resources.redox.inflight import InFlightStats
from resources.redox.settings import RateSpec, RedoxSettings, SigningKey

__all__ = [
    "AuditLog",
    "DataModelClient",
    "DataModelReply",
    "FhirClient",
    "InFlightStats",
    "Page",
    "PageTotalMismatch",
    "RateBudget",
    "RateSpec",
    "RedoxAuthError",
    "RedoxClient",
    "RedoxConfigError",
    "RedoxConnectionError",
    "RedoxDataModelError",
    "RedoxError",
    "RedoxRateLimited",
    "RedoxRequestError",
    "RedoxServerError",
    "RedoxSettings",
    "SigningKey",
    "date_window",
]
