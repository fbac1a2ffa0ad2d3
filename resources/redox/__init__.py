"""The Redox client: auth, one shared rate budget, retries, paging and an audit trail, for both the
FHIR R4 and the Data Model surfaces. Assets use ``RedoxResource.client(run_id=...)``.

``RedoxResource`` is imported lazily: worker processes that only need the client (benchmarks,
scripts) should not pay for importing Dagster.
"""

from typing import Any

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
from resources.redox.settings import RateSpec, RedoxSettings, SigningKey

__all__ = [
    "AuditLog",
    "DataModelClient",
    "DataModelReply",
    "FhirClient",
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
    "RedoxResource",
    "RedoxServerError",
    "RedoxSettings",
    "SigningKey",
    "date_window",
]


def __getattr__(name: str) -> Any:
    if name == "RedoxResource":
        from resources.redox.resource import RedoxResource

        return RedoxResource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
