"""The ONE place that builds and sends HTTP requests to Redox.

Every attempt, on every surface (FHIR, Data Model, auth), goes through ``Transport.send``, which keeps
these invariants:
- the attempt first takes its turn among this client's requests in flight (first come, first served;
  the bound follows the observed latency, see ``inflight``), then a slot from the shared rate budget,
  which alone decides how fast requests leave;
- it is recorded in the audit trail (template, status, attempt, latency, bytes; never a URL, body
  or header);
- 5xx, timeouts, dropped connections, unreadable 2xx bodies and 429s are retried by stamina with
  jittered exponential backoff, bounded in attempts and total time; a 429 also slows the whole
  shared budget before the retry;
- a 401 on an authorized call drops the cached token and is re-sent once with a fresh one;
- any other 4xx raises at once, with the server's own words (redacted of every value this call
  sent), the endpoint template and the status, and nothing else; so does a 5xx listed in
  ``FINAL_STATUSES`` for the calling task (a caller that retries it its own way, e.g. a Data Model
  query that splits its window on 504).
"""

import contextvars
import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
import stamina

from resources.redox.audit import AuditLog, Surface
from resources.redox.budget import RateBudget
from resources.redox.errors import (
    RedoxAuthError,
    RedoxConnectionError,
    RedoxDataModelError,
    RedoxError,
    RedoxRateLimited,
    RedoxRequestError,
    RedoxServerError,
    redact,
)
from resources.redox.inflight import InFlight, InFlightStats
from resources.redox.settings import RedoxSettings

log = logging.getLogger(__name__)

USER_AGENT = "redox-etl/0.1 (+httpx)"
# A 429's own pause happens in the shared budget; stamina only needs to yield briefly before the
# retry re-enters it.
_AFTER_429_BACKOFF_S = 0.05

# 5xx statuses the calling task handles itself instead of retrying (see the module docstring).
FINAL_STATUSES: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "redox_final_statuses", default=frozenset()
)

# Repeated parameters (``date=ge..&date=lt..``) are a list value, as httpx encodes them.
FormData = Mapping[str, str | Sequence[str]]


class Authorizer(Protocol):
    """Supplies the ``Authorization`` header value and forgets it when the server refuses it."""

    async def authorization(self) -> str: ...

    async def invalidate(self, value: str) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """A successful response: the body's exact bytes, its parsed JSON, and where it came from."""

    status: int
    # Bodies can hold PHI: never in a repr that might reach a log or a traceback.
    raw: bytes = dataclasses.field(repr=False)
    json: Any = dataclasses.field(repr=False)
    headers: httpx.Headers = dataclasses.field(repr=False)
    endpoint: str
    attempts: int


class _Retryable(Exception):
    """Wraps an error stamina may retry; unwrapped when attempts run out."""

    def __init__(self, error: RedoxError, *, backoff: float | None = None) -> None:
        self.error = error
        self.backoff = backoff
        super().__init__(str(error))


def _retry_hook(exc: Exception) -> bool | float:
    if isinstance(exc, _Retryable):
        return exc.backoff if exc.backoff is not None else True
    return False


def sent_values(form: FormData | None, body: Any) -> list[str]:
    """Every scalar this request carries, split on commas: what a server might echo back."""
    out: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str):
            out.append(value)
            if "," in value:
                out.extend(part for part in value.split(",") if part)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append(str(value))
        elif isinstance(value, Mapping):
            for item in value.values():
                add(item)
        elif isinstance(value, Iterable) and not isinstance(value, bytes):
            for item in value:
                add(item)

    if form is not None:
        add(list(form.values()))
    add(body)
    return out


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def meta_errors(raw: bytes) -> list[str]:
    """``Meta.Errors[].Text`` of a Data Model body, or nothing."""
    data = _json_or_none(raw)
    meta = data.get("Meta") if isinstance(data, dict) else None
    errors = meta.get("Errors") if isinstance(meta, dict) else None
    return [str(e.get("Text", "")) for e in errors or [] if isinstance(e, dict)]


def server_text(raw: bytes) -> str:
    """The server's own words from an error body, whichever Redox shape it has."""
    data = _json_or_none(raw)
    if isinstance(data, dict):
        if data.get("resourceType") == "OperationOutcome":
            texts = [
                issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code", "")
                for issue in data.get("issue") or []
                if isinstance(issue, dict)
            ]
            return "; ".join(t for t in texts if t)
        meta = data.get("Meta")
        if isinstance(meta, dict) and meta.get("Errors"):
            return "; ".join(str(e.get("Text", "")) for e in meta["Errors"] if isinstance(e, dict))
        if "error" in data:
            described = data.get("error_description")
            return f"{data['error']}: {described}" if described else str(data["error"])
        for field in ("errorDetail", "message", "detail"):
            if isinstance(data.get(field), str):
                return data[field]
        return ""
    return raw.decode("utf-8", "replace").strip()


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        # HTTP-date form; Redox does not document Retry-After at all, so the budget's own pause stands.
        return None


def _limit_header(headers: httpx.Headers) -> int | None:
    value = headers.get("x-ratelimit-limit", "")
    return int(value) if value.isdigit() else None


class Transport:
    """Sends requests for one client: budget, concurrency bound, retries, audit and error mapping."""

    def __init__(
        self,
        *,
        settings: RedoxSettings,
        budget: RateBudget,
        audit: AuditLog,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.budget = budget
        self.audit = audit
        self._http = http or make_http_client(settings)
        self._owns_http = http is None
        # Sized to the budget's own pace: the rate a client can spend, never one it may exceed.
        self.in_flight = InFlight(
            rate_per_s=budget.window_limit / budget.rate.seconds, upper=settings.max_in_flight
        )

    def in_flight_stats(self) -> InFlightStats:
        """The in-flight bound now, its use, and the latency it is sized for."""
        return self.in_flight.stats()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def send(
        self,
        *,
        surface: Surface,
        method: str,
        url: str,
        endpoint: str,
        form: FormData | None = None,
        body: Any = None,
        authorizer: Authorizer | None = None,
        destination: str | None = None,
        accept: str = "application/json",
        expect_json: bool = True,
    ) -> Reply:
        """Send one logical request (possibly several attempts) and return its successful reply.

        ``endpoint`` is the template recorded and shown in errors, e.g.
        ``POST /fhir/R4/{org}/{env}/Patient/_search``; ``url`` may hold values and is never recorded.
        """
        secrets = sent_values(form, body)
        # Shared across stamina's attempts (an attempt that raises returns nothing).
        attempts = [0]
        try:
            async for try_ in stamina.retry_context(
                on=_retry_hook,
                attempts=self.settings.retry_attempts,
                timeout=self.settings.retry_timeout,
                wait_initial=0.25,
                wait_max=15.0,
                wait_jitter=1.0,
            ):
                with try_:
                    reply = await self._attempt(
                        surface=surface,
                        method=method,
                        url=url,
                        endpoint=endpoint,
                        form=form,
                        body=body,
                        authorizer=authorizer,
                        destination=destination,
                        accept=accept,
                        expect_json=expect_json,
                        secrets=secrets,
                        attempts=attempts,
                    )
        except _Retryable as exc:
            raise exc.error from None
        return reply

    async def _attempt(
        self,
        *,
        surface: Surface,
        method: str,
        url: str,
        endpoint: str,
        form: FormData | None,
        body: Any,
        authorizer: Authorizer | None,
        destination: str | None,
        accept: str,
        expect_json: bool,
        secrets: list[str],
        attempts: list[int],
    ) -> Reply:
        refreshed = False
        while True:
            attempts[0] += 1
            attempt = attempts[0]
            headers = {"Accept": accept, "User-Agent": USER_AGENT}
            credential = None
            if authorizer is not None:
                # Taken before the in-flight slot: a token fetch needs a slot of its own.
                credential = await authorizer.authorization()
                headers["Authorization"] = credential
            response = await self._send_once(
                surface=surface,
                method=method,
                url=url,
                endpoint=endpoint,
                form=form,
                body=body,
                headers=headers,
                destination=destination,
                attempt=attempt,
            )
            status = response.status_code
            if status == 401 and authorizer is not None and credential is not None and not refreshed:
                log.info("%s -> 401; refreshing the token once and re-sending", endpoint)
                await authorizer.invalidate(credential)
                refreshed = True
                continue
            if status == 429:
                await self._slow_down(response)
            return self._interpret(response, endpoint, surface, expect_json, secrets, attempt)

    async def _slow_down(self, response: httpx.Response) -> None:
        limit = _limit_header(response.headers)
        if limit is not None and limit < self.budget.rate.limit:
            log.warning(
                "Redox reports a limit of %d but REDOX_RATE_LIMIT says %d; lower REDOX_RATE_LIMIT",
                limit,
                self.budget.rate.limit,
            )
        await self.budget.slow_down(retry_after=_retry_after(response.headers))

    async def _send_once(
        self,
        *,
        surface: Surface,
        method: str,
        url: str,
        endpoint: str,
        form: FormData | None,
        body: Any,
        headers: dict[str, str],
        destination: str | None,
        attempt: int,
    ) -> httpx.Response:
        async with self.in_flight.slot():
            await self.budget.acquire(destination)
            called_at = datetime.now(UTC)
            failure: Exception | None = None
            # The round trip is timed from the budget's grant: its wait is not the server's latency.
            with self.in_flight.on_wire() as trip:
                try:
                    response = await self._http.request(
                        method,
                        url,
                        data=form,
                        json=body,
                        headers=headers,
                    )
                    # Read the whole body inside the timing, so latency covers what a page costs.
                    raw = response.content
                except (httpx.TimeoutException, httpx.TransportError) as exc:
                    failure = exc
        if failure is not None:
            self.audit.record(
                surface=surface,
                method=method,
                endpoint=endpoint,
                status=None,
                attempt=attempt,
                latency_ms=trip.seconds * 1000,
                size=0,
                called_at=called_at,
            )
            # Only the exception's type: httpx messages can include the URL.
            error = RedoxConnectionError(endpoint=endpoint, cause=type(failure).__name__)
            raise _Retryable(error) from None
        self.audit.record(
            surface=surface,
            method=method,
            endpoint=endpoint,
            status=response.status_code,
            attempt=attempt,
            latency_ms=trip.seconds * 1000,
            size=len(raw),
            called_at=called_at,
        )
        return response

    def _interpret(
        self,
        response: httpx.Response,
        endpoint: str,
        surface: Surface,
        expect_json: bool,
        secrets: list[str],
        attempts: int,
    ) -> Reply:
        status = response.status_code
        raw = response.content
        if 200 <= status < 300:
            parsed: Any = None
            if expect_json:
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    # A 2xx we cannot read is a transient fault (cut or garbled body), not data.
                    error = RedoxServerError(
                        status=status, server_text="response body is not valid JSON", endpoint=endpoint
                    )
                    raise _Retryable(error) from None
            return Reply(
                status=status,
                raw=raw,
                json=parsed,
                headers=response.headers,
                endpoint=endpoint,
                attempts=attempts,
            )
        text = redact(server_text(raw), secrets)
        if status == 429:
            limited = RedoxRateLimited(
                status=status,
                server_text=text,
                endpoint=endpoint,
                retry_after=_retry_after(response.headers),
                limit=_limit_header(response.headers),
            )
            raise _Retryable(limited, backoff=_AFTER_429_BACKOFF_S)
        if status >= 500 and status not in FINAL_STATUSES.get():
            raise _Retryable(RedoxServerError(status=status, server_text=text, endpoint=endpoint))
        if surface == "datamodel" and (texts := meta_errors(raw)):
            raise RedoxDataModelError(
                status=status, endpoint=endpoint, texts=[redact(t, secrets) for t in texts]
            )
        if surface == "auth" or status == 401:
            raise RedoxAuthError(status=status, server_text=text, endpoint=endpoint)
        raise RedoxRequestError(status=status, server_text=text, endpoint=endpoint)


def make_http_client(settings: RedoxSettings) -> httpx.AsyncClient:
    """HTTP/1.1 keep-alive pool with a connection for every request the in-flight bound can admit at
    its largest (``max_in_flight``), so no request waits for the pool; every timeout explicit."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=settings.connect_timeout,
            read=settings.read_timeout,
            write=settings.connect_timeout,
            pool=settings.read_timeout,
        ),
        limits=httpx.Limits(
            max_connections=settings.max_in_flight + 2,
            max_keepalive_connections=settings.max_in_flight + 2,
        ),
        http1=True,
        http2=False,
        follow_redirects=False,
    )
