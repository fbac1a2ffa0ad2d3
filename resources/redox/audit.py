"""The audit trail: one row per HTTP attempt, shaped like the warehouse's ``api_calls`` table.

Invariant: a row holds only the endpoint TEMPLATE (``POST /fhir/R4/{org}/{env}/Patient/_search``),
never a concrete URL, query string, body or header, so the trail can be loaded, logged and shown in
Dagster metadata without carrying PHI or secrets.
"""

import dataclasses
import threading
from collections import Counter
from datetime import UTC, datetime
from typing import Literal

import polars as pl

from schema import API_CALLS

Surface = Literal["fhir", "datamodel", "auth"]


@dataclasses.dataclass(frozen=True, slots=True)
class ApiCall:
    called_at: datetime
    surface: Surface
    method: str
    endpoint: str
    status: int | None
    attempt: int
    latency_ms: float
    bytes: int
    run_id: str | None


class AuditLog:
    """Append-only, in memory for the life of one client; the asset loads it as ``api_calls``."""

    def __init__(self, *, run_id: str | None = None) -> None:
        self.run_id = run_id
        self._rows: list[ApiCall] = []
        self._lock = threading.Lock()

    def record(
        self,
        *,
        surface: Surface,
        method: str,
        endpoint: str,
        status: int | None,
        attempt: int,
        latency_ms: float,
        size: int,
        called_at: datetime | None = None,
    ) -> ApiCall:
        row = ApiCall(
            called_at=called_at or datetime.now(UTC),
            surface=surface,
            method=method,
            endpoint=endpoint,
            status=status,
            attempt=attempt,
            latency_ms=latency_ms,
            bytes=size,
            run_id=self.run_id,
        )
        with self._lock:
            self._rows.append(row)
        return row

    @property
    def rows(self) -> list[ApiCall]:
        with self._lock:
            return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def frame(self) -> pl.DataFrame:
        """The rows with exactly the ``api_calls`` schema (status is null when no response came)."""
        rows = self.rows
        return pl.DataFrame(
            {name: [getattr(row, name) for row in rows] for name in API_CALLS.names()},
            schema=API_CALLS,
        )

    def summary(self) -> dict[str, int]:
        """Counts a person wants in Dagster metadata: attempts, per surface and per status class."""
        rows = self.rows
        counts: Counter[str] = Counter()
        counts["requests"] = len(rows)
        for row in rows:
            counts[f"requests_{row.surface}"] += 1
            counts["status_" + (f"{row.status // 100}xx" if row.status else "none")] += 1
            if row.status == 429:
                counts["status_429"] += 1
        return dict(counts)
