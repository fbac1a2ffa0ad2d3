"""FHIR R4 searches as async iterators of pages.

Invariants:
- a page keeps the response body's exact bytes (the landing zone stores them as-is) beside the
  parsed Bundle;
- a search follows ``link[relation=next]`` until there is none, only to the configured Redox host
  (the bearer token never goes elsewhere), and never to a page it has already fetched;
- when the first page states ``Bundle.total``, the distinct entries received are counted against it
  and a difference raises ``PageTotalMismatch`` after the last page: it is never ignored. An entry
  served again on a later page (a cursor that restarts one record early) is counted once and
  reported in ``Page.duplicates``; the raw bytes still hold it, and the warehouse's natural key
  (surface, source id) keeps it once;
- a search asks for ``fhir_page_size`` entries per page (``_count``) unless the caller set one;
- paging is sequential within a search (each next link comes with the page before it), so a caller
  overlaps searches, not pages: any number of searches may run at once, and the transport alone
  bounds how many requests are in flight (first come, first served, sized to the rate budget);
- searches for many patients are split into batches of comma-separated ids (OR in FHIR), bounded
  by count and by length, and every batch starts at once: no second bound here, which would cap
  them below what the budget allows at Redox's latency.
"""

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

from resources.redox.errors import PageTotalMismatch, RedoxRequestError, redact
from resources.redox.settings import RedoxSettings
from resources.redox.transport import Authorizer, FormData, Transport, sent_values, server_text

FHIR_JSON = "application/fhir+json"
# Form bodies have no documented size limit at Redox; keeping one value near a URL's safe length
# keeps a batch valid even if a proxy turns it into a GET query.
MAX_VALUE_CHARS = 1800
_END = object()


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    """One searchset Bundle as received. ``params`` may hold patient ids: it is kept out of repr."""

    resource: str
    endpoint: str
    number: int
    raw: bytes = dataclasses.field(repr=False)
    bundle: dict[str, Any] = dataclasses.field(repr=False)
    total: int | None
    entries: int
    params: Mapping[str, str | Sequence[str]] = dataclasses.field(repr=False)
    batch: int = 0
    duplicates: int = 0

    @property
    def resources(self) -> list[dict[str, Any]]:
        return [
            e["resource"] for e in self.bundle.get("entry") or [] if isinstance(e, dict) and "resource" in e
        ]

    @property
    def next_url(self) -> str | None:
        for link in self.bundle.get("link") or []:
            if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
                return str(link["url"])
        return None


def fhir_instant(moment: datetime) -> str:
    """A timezone-aware datetime as FHIR wants it in search values: UTC with ``Z``."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: pass a timezone-aware value (the pipeline works in UTC)")
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def date_window(start: datetime, end: datetime, *, param: str = "date") -> dict[str, list[str]]:
    """``param=ge<start>&param=lt<end>``: a half-open window, so adjacent partitions never overlap."""
    return {param: [f"ge{fhir_instant(start)}", f"lt{fhir_instant(end)}"]}


def batches(ids: Sequence[str], *, size: int, max_chars: int = MAX_VALUE_CHARS) -> list[list[str]]:
    """Split ids into comma-joined groups of at most ``size`` ids and ``max_chars`` characters."""
    out: list[list[str]] = []
    current: list[str] = []
    length = 0
    for value in dict.fromkeys(ids):  # drop repeats, keep order
        if "," in value:
            raise ValueError("an id containing ',' cannot be sent in a comma-separated search")
        added = len(value) + (1 if current else 0)
        if current and (len(current) >= size or length + added > max_chars):
            out.append(current)
            current, length = [], 0
            added = len(value)
        current.append(value)
        length += added
    if current:
        out.append(current)
    return out


def _match_keys(bundle: Mapping[str, Any]) -> list[str]:
    """Identities of the entries that count toward ``total`` ('include' entries do not)."""
    keys = []
    for position, entry in enumerate(bundle.get("entry") or []):
        if not isinstance(entry, dict):
            continue
        if (entry.get("search") or {}).get("mode") not in (None, "match"):
            continue
        resource = entry.get("resource") or {}
        key = entry.get("fullUrl") or (
            f"{resource.get('resourceType')}/{resource['id']}"
            if isinstance(resource, dict) and "id" in resource
            # Without any identity an entry can only be counted, never recognised again.
            else f"#{id(bundle)}:{position}"
        )
        keys.append(str(key))
    return keys


class FhirClient:
    """Searches one FHIR base (``{base}/fhir/R4/{org}/{environment}``)."""

    def __init__(self, *, settings: RedoxSettings, transport: Transport, authorizer: Authorizer) -> None:
        self._settings = settings
        self._transport = transport
        self._authorizer = authorizer
        base = urlsplit(settings.base_url)
        self._origin = (base.scheme, base.netloc)

    def _template(self, resource: str, suffix: str = "/_search") -> str:
        return f"/fhir/R4/{{org}}/{{env}}/{resource}{suffix}"

    async def search(
        self,
        resource: str,
        *,
        params: FormData | None = None,
        check_total: bool = True,
        batch: int = 0,
    ) -> AsyncGenerator[Page, None]:
        """Pages of ``POST {base}/{resource}/_search`` with ``params``, following next links."""
        form: dict[str, str | Sequence[str]] = dict(params or {})
        if self._settings.fhir_page_size and "_count" not in form:
            form["_count"] = str(self._settings.fhir_page_size)
        endpoint = "POST " + self._template(resource)
        reply = await self._transport.send(
            surface="fhir",
            method="POST",
            url=f"{self._settings.fhir_base}/{resource}/_search",
            endpoint=endpoint,
            form=form,
            authorizer=self._authorizer,
            destination="fhir",
            accept=FHIR_JSON,
        )
        total: int | None = None
        received: set[str] = set()
        number = 0
        seen: set[str] = set()
        while True:
            bundle = reply.json
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                # A server may answer 200 with an OperationOutcome (a failed search it did not map
                # to a status): its diagnostics are the only account of what went wrong. Any other
                # body is not quoted: it may be records, i.e. patient data.
                said = ""
                if isinstance(bundle, dict) and bundle.get("resourceType") == "OperationOutcome":
                    said = redact(server_text(reply.raw), sent_values(form, None))
                raise RedoxRequestError(
                    status=reply.status,
                    server_text="the response is not a FHIR Bundle" + (f": {said}" if said else ""),
                    endpoint=endpoint,
                    hint="check REDOX_FHIR_ORG and REDOX_ENVIRONMENT point at a FHIR destination",
                )
            number += 1
            if number == 1 and isinstance(bundle.get("total"), int):
                total = bundle["total"]
            keys = _match_keys(bundle)
            duplicates = sum(1 for key in keys if key in received)
            received.update(keys)
            page = Page(
                resource=resource,
                endpoint=endpoint,
                number=number,
                raw=reply.raw,
                bundle=bundle,
                total=total,
                entries=len(bundle.get("entry") or []),
                params=form,
                batch=batch,
                duplicates=duplicates,
            )
            yield page
            next_url = page.next_url
            if next_url is None:
                break
            next_url = self._checked_next(next_url, endpoint, seen)
            endpoint = "GET " + self._template(resource, "?{next-page}")
            reply = await self._transport.send(
                surface="fhir",
                method="GET",
                url=next_url,
                endpoint=endpoint,
                authorizer=self._authorizer,
                destination="fhir",
                accept=FHIR_JSON,
            )
        if check_total and total is not None and len(received) != total:
            raise PageTotalMismatch(
                endpoint="POST " + self._template(resource), total=total, received=len(received), pages=number
            )

    def _checked_next(self, url: str, endpoint: str, seen: set[str]) -> str:
        absolute = urljoin(self._settings.fhir_base + "/", url)
        parts = urlsplit(absolute)
        if (parts.scheme, parts.netloc) != self._origin:
            raise RedoxRequestError(
                status=200,
                server_text="a next link points to another host",
                endpoint=endpoint,
                hint="refusing to send the token elsewhere; check REDOX_BASE_URL",
            )
        if absolute in seen:
            raise RedoxRequestError(
                status=200,
                server_text="a next link repeats an earlier page",
                endpoint=endpoint,
                hint="the server's paging loops; report it to Redox",
            )
        seen.add(absolute)
        return absolute

    async def search_patients(
        self,
        resource: str,
        *,
        patients: Sequence[str],
        params: FormData | None = None,
        patient_param: str = "patient",
        batch_size: int | None = None,
        check_total: bool = True,
    ) -> AsyncIterator[Page]:
        """Pages of searches for many patients at once, batched as ``patient=a,b,c`` (an OR).

        Use ``patient_param="_id"`` to fetch Patient resources themselves. Batches run concurrently
        (the transport's in-flight bound decides how many are on the wire); pages arrive in
        completion order, each tagged with its ``batch`` index.
        """
        groups = batches(patients, size=batch_size or self._settings.fhir_batch_size)
        if not groups:
            return
        queue: asyncio.Queue[Page | BaseException | object] = asyncio.Queue(maxsize=2 * len(groups) + 8)

        async def run(index: int, ids: list[str]) -> None:
            form = {**(params or {}), patient_param: ",".join(ids)}
            try:
                async for page in self.search(resource, params=form, check_total=check_total, batch=index):
                    await queue.put(page)
            except Exception as exc:
                await queue.put(exc)

        tasks = [asyncio.create_task(run(i, ids)) for i, ids in enumerate(groups)]
        done = asyncio.create_task(_after(tasks, queue))
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, Page)
                yield item
        finally:
            for task in (*tasks, done):
                task.cancel()
            await asyncio.gather(*tasks, done, return_exceptions=True)


async def _after(tasks: list[asyncio.Task[None]], queue: asyncio.Queue[Any]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)
    await queue.put(_END)
