"""Typed queries against the Redox Data Model API (``POST /endpoint``).

Invariants:
- every query carries a full ``Meta`` (DataModel, EventType, EventDateTime, Test, Source and the
  data model's Destination when configured), with datetimes in UTC ISO 8601 with milliseconds;
- a reply keeps the body's exact bytes beside the parsed JSON, for the landing zone;
- ``Meta.Errors`` non-empty means failure whatever the HTTP status: it raises
  ``RedoxDataModelError`` carrying the server's texts (redacted of every value the query sent);
- ``windowed`` covers its window exactly once: the replies' windows are disjoint, half-open, in
  order and together [start, end), split at the same points for the same refusals.
"""

import asyncio
import dataclasses
import itertools
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from resources.redox.errors import RedoxDataModelError, RedoxRequestError, redact
from resources.redox.settings import RedoxSettings
from resources.redox.transport import FINAL_STATUSES, Authorizer, Transport, sent_values

Identifier = Mapping[str, str]
"""A Redox identifier: ``{"ID": "0000000001", "IDType": "MR"}``."""

# Redox's answers to a query too big for one response: 413 (payload over its size limit) and 504
# (the round trip took longer than ~120 s). A shorter window asks for less.
SPLIT_ON: Final = frozenset({413, 504})
# Below this a window is not split further: a quarter hour that Redox cannot answer is not a
# question of size, and halving on would only spend the rate budget.
MIN_WINDOW: Final = timedelta(minutes=15)


@dataclasses.dataclass(frozen=True, slots=True)
class DataModelReply:
    data_model: str
    event_type: str
    endpoint: str
    raw: bytes = dataclasses.field(repr=False)
    json: dict[str, Any] = dataclasses.field(repr=False)


def redox_datetime(moment: datetime) -> str:
    """``2023-02-27T22:09:03.585Z``: the form Redox's data models use."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: pass a timezone-aware value (the pipeline works in UTC)")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _patients(patients: Sequence[Identifier | Sequence[Identifier]]) -> list[dict[str, Any]]:
    out = []
    for patient in patients:
        identifiers = [patient] if isinstance(patient, Mapping) else list(patient)
        out.append({"Identifiers": [dict(i) for i in identifiers]})
    return out


class DataModelClient:
    """The Data Model queries the pipeline needs, plus ``query`` for any other."""

    def __init__(self, *, settings: RedoxSettings, transport: Transport, authorizer: Authorizer) -> None:
        self._settings = settings
        self._transport = transport
        self._authorizer = authorizer

    def _meta(self, data_model: str, event_type: str) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "DataModel": data_model,
            "EventType": event_type,
            "EventDateTime": redox_datetime(datetime.now(UTC)),
            "Test": self._settings.environment != "Production",
        }
        if self._settings.source_id:
            meta["Source"] = {"ID": self._settings.source_id}
        destination = self._settings.destination_ids.get(data_model.replace(" ", "").lower())
        if destination:
            # A sync query names exactly one destination.
            meta["Destinations"] = [{"ID": destination}]
        return meta

    async def query(self, data_model: str, event_type: str, payload: Mapping[str, Any]) -> DataModelReply:
        """Send ``payload`` with a Meta for ``data_model``/``event_type`` and return the reply."""
        body = {"Meta": self._meta(data_model, event_type), **payload}
        endpoint = f"POST /endpoint ({data_model}.{event_type})"
        reply = await self._transport.send(
            surface="datamodel",
            method="POST",
            url=self._settings.datamodel_url,
            endpoint=endpoint,
            body=body,
            authorizer=self._authorizer,
            destination=data_model.replace(" ", "").lower(),
        )
        data = reply.json
        if not isinstance(data, dict):
            raise RedoxRequestError(
                status=reply.status, server_text="the response is not a JSON object", endpoint=endpoint
            )
        errors = (data.get("Meta") or {}).get("Errors") or []
        if errors:
            secrets = sent_values(None, payload)
            texts = [redact(str(e.get("Text", "")), secrets) for e in errors if isinstance(e, dict)]
            raise RedoxDataModelError(endpoint=endpoint, texts=texts, status=reply.status)
        return DataModelReply(
            data_model=data_model, event_type=event_type, endpoint=endpoint, raw=reply.raw, json=data
        )

    async def patient_search(
        self,
        *,
        identifiers: Sequence[Identifier] | None = None,
        demographics: Mapping[str, Any] | None = None,
    ) -> DataModelReply:
        """PatientSearch.Query by identifiers or by demographics (names, DOB, sex, address...)."""
        if not identifiers and not demographics:
            raise ValueError("patient_search needs identifiers or demographics")
        patient: dict[str, Any] = {}
        if identifiers:
            patient["Identifiers"] = [dict(i) for i in identifiers]
        if demographics:
            patient["Demographics"] = dict(demographics)
        return await self.query("PatientSearch", "Query", {"Patient": patient})

    async def scheduling_booked(self, *, start: datetime, end: datetime) -> DataModelReply:
        """Scheduling.Booked: appointments booked in [start, end)."""
        return await self.query(
            "Scheduling",
            "Booked",
            {"StartDateTime": redox_datetime(start), "EndDateTime": redox_datetime(end)},
        )

    async def results_query(
        self,
        *,
        start: datetime,
        end: datetime,
        patients: Sequence[Identifier | Sequence[Identifier]] | None = None,
    ) -> DataModelReply:
        """Results.Query: orders completed in [start, end), optionally for some patients only.

        A patient is one identifier or a list of them (``{"ID": ..., "IDType": ...}``).
        """
        payload: dict[str, Any] = {
            "Completion": {"StartDateTime": redox_datetime(start), "EndDateTime": redox_datetime(end)}
        }
        if patients:
            payload["Patients"] = _patients(patients)
        return await self.query("Results", "Query", payload)

    async def results_changed(self, *, start: datetime, end: datetime | None = None) -> DataModelReply:
        """Results.Query by ``LastUpdated``: orders whose results changed in [start, end) (no end:
        up to now), whenever they were completed (corrections of old results)."""
        window = {"StartDateTime": redox_datetime(start)}
        if end is not None:
            window["EndDateTime"] = redox_datetime(end)
        return await self.query("Results", "Query", {"LastUpdated": window})

    async def visit_query(self, *, start: datetime, end: datetime) -> DataModelReply:
        """PatientAdmin.VisitQuery: visits starting in [start, end)."""
        return await self.query(
            "PatientAdmin",
            "VisitQuery",
            {"VisitStartDateTime": redox_datetime(start), "VisitEndDateTime": redox_datetime(end)},
        )

    async def windowed(
        self,
        query: str,
        *,
        start: datetime,
        end: datetime,
        min_window: timedelta = MIN_WINDOW,
        pieces: int = 1,
    ) -> list[DataModelReply]:
        """``query`` ("PatientAdmin.VisitQuery", "Results.Query" or "Scheduling.Booked") over
        [start, end), in as many windows as it takes: the window is first cut into ``pieces`` equal
        windows (a caller that knows a neighbouring day needed several asks for them at once instead
        of waiting out a 504), and a window Redox refuses as too large (413) or times out on (504)
        is split in two halves at its midpoint (whole milliseconds, as Redox's datetimes carry).
        Windows are asked concurrently; the replies come back in window order.

        A window whose halves would be shorter than ``min_window`` is not split: its error is raised.
        The 504 is not retried as the same query first (the split is the retry).
        """
        queries: dict[str, Callable[..., Awaitable[DataModelReply]]] = {
            "PatientAdmin.VisitQuery": self.visit_query,
            "Results.Query": self.results_query,
            "Scheduling.Booked": self.scheduling_booked,
        }
        if query not in queries:
            raise ValueError(f"windowed answers {', '.join(queries)}, not {query!r}")
        if end <= start:
            raise ValueError("windowed needs start < end")
        send = queries[query]

        async def cover(lo: datetime, hi: datetime) -> list[DataModelReply]:
            try:
                return [await send(start=lo, end=hi)]
            except RedoxRequestError as err:
                half = (hi - lo) // timedelta(milliseconds=1) // 2
                if err.status not in SPLIT_ON or timedelta(milliseconds=half) < min_window:
                    raise
            mid = lo + timedelta(milliseconds=half)
            return await _in_order([cover(lo, mid), cover(mid, hi)])

        span = (end - start) // timedelta(milliseconds=1)
        count = max(1, min(pieces, span // max(1, min_window // timedelta(milliseconds=1))))
        edges = [start + timedelta(milliseconds=span * i // count) for i in range(count)] + [end]
        # Tasks copy the context, so every window's sends see the statuses the split handles.
        token = FINAL_STATUSES.set(FINAL_STATUSES.get() | SPLIT_ON)
        try:
            return await _in_order([cover(lo, hi) for lo, hi in itertools.pairwise(edges)])
        finally:
            FINAL_STATUSES.reset(token)


async def _in_order(covers: Sequence[Coroutine[Any, Any, list[DataModelReply]]]) -> list[DataModelReply]:
    """The windows' replies, concatenated in window order. The first failure is raised as it was
    (the server's own error, not a group) after the other windows are cancelled."""
    tasks = [asyncio.ensure_future(c) for c in covers]
    try:
        parts = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return [reply for part in parts for reply in part]
