"""The sandbox's HTTP application: Redox's auth, FHIR and Data Model surfaces plus admin endpoints.

``create_app(sandbox)`` returns a starlette app around one ``Sandbox``: the world (records and
clock), the registered client keys, the rate limiter, the fault injector and the request stats.

Every Redox-facing request passes the same gate, in this order: rate limit (429 +
``X-RateLimit-Limit``) -> bearer token (401, not for the token endpoints) -> injected faults (clinical
endpoints only) -> handler -> the latency model's wait (clinical endpoints only; a Data Model answer
may instead be refused with 413 or time out with 504, see sandbox/latency.py); its endpoint
template and final status are counted. ``/sandbox/*`` admin
endpoints skip the gate: no auth, no rate limit, no faults [I].

Invariants:
- handlers run on the event loop thread, with one exception: while latency is on, Data Model
  answers are built in one worker thread, so a large answer does not stall the loop. The store is
  thread-safe, the Data Model surface's caches are touched by that one thread only, faults and
  latency draws take their own locks, and request counters stay on the loop;
- nothing is logged but endpoint templates, counts and opaque ids (no tokens, keys, PHI or URLs
  with query strings: uvicorn's access log is off).
"""

import asyncio
import concurrent.futures
import dataclasses
import io
import json
import secrets
import threading
import uuid
import zipfile
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox import auth
from sandbox.datamodel import Answer, DataModelSurface
from sandbox.faults import Faults, FaultSpec
from sandbox.fhir import RESOURCES, FhirSurface, StoreLike, operation_outcome
from sandbox.latency import DEFAULT_MAX_RESPONSE_RECORDS, DEFAULT_ROUND_TRIP_LIMIT, LatencySpec, Pacer
from sandbox.push import Pusher, PushOptions
from sandbox.ratelimit import RateLimiter

FHIR_JSON = "application/fhir+json"
JSON = "application/json"
DEFAULT_ORG = "redox-fhir-sandbox"
DEFAULT_ENVIRONMENT = "Development"
ENVIRONMENTS = ("Development", "Staging", "Production")

Gate = Literal["auth", "fhir", "datamodel"]


class WorldLike(Protocol):
    store: Any

    def advance(self, delta: timedelta) -> dict[str, int]: ...

    def truth(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class SandboxOptions:
    """Everything `redox-etl sandbox serve` can be told; defaults match Redox's documented ones."""

    seed: int = 7
    patients: int = 1000
    start: date | None = None
    end: date | None = None
    rate_limit: tuple[int, float] | None = (7500, 300.0)
    faults: str | None = None
    token_ttl: int = 300
    retry_after: bool = False
    org: str = DEFAULT_ORG
    environment: str = DEFAULT_ENVIRONMENT
    fhir_tz: str = "America/New_York"
    # The push subscription (sandbox/push.py): where to deliver, with which verification token.
    push_to: str | None = None
    push_token: str | None = dataclasses.field(default=None, repr=False)
    push_verification: str = "POST"
    push_retry: tuple[float, float] = (5.0, 90.0)
    push_redeliver: float = 0.0
    # How long answers take and Redox's limits on a Data Model answer (sandbox/latency.py).
    latency: str = "none"
    max_response_records: int = DEFAULT_MAX_RESPONSE_RECORDS
    round_trip_limit: float = DEFAULT_ROUND_TRIP_LIMIT
    # A population profile (sandbox/population/profiles.py) sets the persons and daily rates;
    # None keeps ``patients`` persons at the default rates.
    profile: str | None = None


class Stats:
    """Request counts by endpoint template and status; 429s, 413s and 504s sent."""

    def __init__(self) -> None:
        self.by_endpoint: Counter[tuple[str, int]] = Counter()
        self.datamodel: Counter[str] = Counter()
        self.sent_429 = 0
        self.sent_413 = 0
        self.sent_504 = 0

    def record(self, template: str, status: int) -> None:
        self.by_endpoint[(template, status)] += 1
        if status == 429:
            self.sent_429 += 1
        elif status == 413:
            self.sent_413 += 1
        elif status == 504:
            self.sent_504 += 1

    def reset(self) -> None:
        self.by_endpoint.clear()
        self.datamodel.clear()
        self.sent_429 = self.sent_413 = self.sent_504 = 0


class Sandbox:
    """One running sandbox's state. Build it, then ``create_app(sandbox)``; set ``base_url`` once bound."""

    def __init__(
        self, world: WorldLike, options: SandboxOptions, *, base_url: str = "http://127.0.0.1"
    ) -> None:
        self.world = world
        self.options = options
        self.client_id = str(uuid.uuid4())
        self.keys = [
            auth.new_rsa_key(f"sandbox-{secrets.token_hex(4)}"),
            auth.new_ec_key(f"sandbox-{secrets.token_hex(4)}"),
        ]
        self.auth = auth.AuthService(token_ttl=options.token_ttl)
        for key in self.keys:
            self.auth.register_key(self.client_id, key.kid, key.public_key)
        self.legacy_api_key = str(uuid.uuid4())
        self.legacy_secret = secrets.token_urlsafe(24)
        self.auth.register_legacy(self.legacy_api_key, self.legacy_secret)
        limit, window = options.rate_limit if options.rate_limit else (None, 300.0)
        self.limiter = RateLimiter(limit, window)
        self.faults = Faults(FaultSpec.parse(options.faults), seed=options.seed)
        self.stats = Stats()
        self.tz = ZoneInfo(options.fhir_tz)
        self.fhir = FhirSurface(self.store, fhir_base="", tz=self.tz, faults=self.faults)
        self.pacer = Pacer(
            LatencySpec.parse(options.latency),
            seed=options.seed,
            max_response_records=options.max_response_records,
            round_trip_limit=options.round_trip_limit,
        )
        self.datamodel = DataModelSurface(self.store, faults=self.faults, pacer=self.pacer)
        # One thread: answers stay in arrival order and the surface's caches see one thread only.
        self.datamodel_worker = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="redox-sandbox-datamodel")
            if self.pacer.spec.active
            else None
        )
        # Held while that worker builds an answer and while the world advances: an answer never
        # sees half an advance (FHIR answers are built on the loop, which an advance blocks).
        self.answering = threading.Lock()
        self.base_url = base_url
        self.pusher: Pusher | None = None

    def start_pusher(self) -> None:
        """Start the push subscription the options ask for (none without ``push_to``)."""
        options = self.options
        if options.push_to is None or self.pusher is not None:
            return
        push = PushOptions(
            url=options.push_to,
            token=options.push_token or "",
            verification=options.push_verification,
            retry_first=options.push_retry[0],
            retry_cap=options.push_retry[1],
            redeliver=options.push_redeliver,
            seed=options.seed,
        )
        self.pusher = Pusher(self.world.store, push, tz=self.tz).start()

    def stop_workers(self) -> None:
        """Stop the push subscription and the Data Model worker thread, if any."""
        if self.pusher is not None:
            self.pusher.stop()
        if self.datamodel_worker is not None:
            self.datamodel_worker.shutdown(wait=False, cancel_futures=True)

    def store(self) -> StoreLike:
        return self.world.store

    @property
    def base_url(self) -> str:
        return self._base_url

    @base_url.setter
    def base_url(self, value: str) -> None:
        self._base_url = value.rstrip("/")
        self.fhir.fhir_base = self.fhir_base

    @property
    def fhir_base(self) -> str:
        return f"{self._base_url}/fhir/R4/{self.options.org}/{self.options.environment}"

    def credentials(self) -> dict[str, Any]:
        """What a client needs to call this sandbox; written to credentials.json (0600)."""
        primary, second = self.keys
        return {
            "base_url": self.base_url,
            "token_url": f"{self.base_url}/v2/auth/token",
            "fhir_base": self.fhir_base,
            "datamodel_url": f"{self.base_url}/endpoint",
            "fhir_org": self.options.org,
            "environment": self.options.environment,
            "client_id": self.client_id,
            "kid": primary.kid,
            "algorithm": primary.algorithm,
            "private_key_pem": primary.private_pem(),
            "second_kid": second.kid,
            "second_algorithm": second.algorithm,
            "second_private_key_pem": second.private_pem(),
            "legacy_api_key": self.legacy_api_key,
            "legacy_secret": self.legacy_secret,
            "token_ttl": self.options.token_ttl,
            "fhir_tz": self.options.fhir_tz,
        }

    def stats_body(self) -> dict[str, Any]:
        store = self.store()
        by_endpoint: dict[str, dict[str, int]] = {}
        for (template, status), n in sorted(self.stats.by_endpoint.items()):
            by_endpoint.setdefault(template, {})[str(status)] = n
        return {
            "clock": store.clock.isoformat(),
            "head_seq": store.head_seq,
            "requests": {"total": sum(self.stats.by_endpoint.values()), "by_endpoint": by_endpoint},
            "datamodel_events": dict(self.stats.datamodel),
            "responses_429": self.stats.sent_429,
            # Every 413 and 504 sent, whatever sent it (the answer limits below, or injected faults).
            "responses_413": self.stats.sent_413,
            "responses_504": self.stats.sent_504,
            "rate_limit": {
                "limit": self.limiter.limit,
                "window_seconds": self.limiter.window,
                "refused": self.limiter.refused,
                "peak_in_window": dict(self.limiter.peak),
                "peak": max(self.limiter.peak.values(), default=0),
            },
            "latency": self.pacer.stats(),
            "limits": {
                "max_response_records": self.pacer.max_response_records,
                "round_trip_limit": self.pacer.round_trip_limit,
                "refused_oversize": self.pacer.refused_oversize,
                "round_trip_timeouts": self.pacer.round_trip_timeouts,
            },
            "faults": dict(self.faults.counts),
            "malformed": [m.as_dict() for m in self.faults.malformed],
        }


# -- helpers --------------------------------------------------------------------------------------


def _json(
    body: Any, status: int = 200, *, media_type: str = JSON, headers: dict[str, str] | None = None
) -> Response:
    raw = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    return Response(raw, status_code=status, media_type=media_type, headers=headers)


def _surface_error(
    gate: Gate, sandbox: Sandbox, status: int, text: str, code: str, headers: dict[str, str] | None = None
) -> Response:
    if gate == "fhir":
        return _json(operation_outcome(text, code), status, media_type=FHIR_JSON, headers=headers)
    if gate == "datamodel":
        module = {401: "Authentication", 429: "RateLimit"}.get(status, "Server")
        return _json(sandbox.datamodel.error_body(text, None, module), status, headers=headers)
    return _json(
        {"error": code, "error_description": text, "error_uri": auth.ERROR_URI}, status, headers=headers
    )


async def _form_pairs(request: Request) -> list[tuple[str, str]]:
    pairs = list(request.query_params.multi_items())
    if request.method != "POST":
        return pairs
    body = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("application/json", FHIR_JSON) and body.strip():
        try:
            parsed = json.loads(body)
        except ValueError:
            raise ValueError("Search body is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise ValueError("A JSON search body must be an object of parameter names to values")
        for name, value in parsed.items():
            for item in value if isinstance(value, list) else [value]:
                pairs.append((str(name), str(item)))
        return pairs
    pairs.extend(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    return pairs


Handler = Callable[[Request], Awaitable[Response]]


class _Gate:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    async def run(self, request: Request, gate: Gate, template: str, handler: Handler) -> Response:
        response = await self._gated(request, gate, template, handler)
        self.sandbox.stats.record(template, response.status_code)
        return response

    async def _gated(self, request: Request, gate: Gate, template: str, handler: Handler) -> Response:
        sandbox = self.sandbox
        ip = request.client.host if request.client else "unknown"
        if not sandbox.limiter.allow(ip):
            return self._too_many(gate, ip)
        if gate in ("fhir", "datamodel"):
            reason = sandbox.auth.check_bearer(request.headers.get("authorization"), gate)
            if reason is not None:
                code = "login" if gate == "fhir" else "invalid_token"
                return _surface_error(gate, sandbox, 401, reason, code, {"WWW-Authenticate": "Bearer"})
            fault = sandbox.faults.request_fault()
            if fault == "429":
                return self._too_many(gate, ip)
            if fault == "timeout":
                await asyncio.sleep(sandbox.faults.spec.timeout_seconds)
                return Response(
                    b"<html><body><h1>504 Gateway Time-out</h1></body></html>",
                    504,
                    media_type="text/html",
                    headers={"Connection": "close"},
                )
            if fault == "5xx":
                status = sandbox.faults.server_error_status()
                if status == 500:
                    return _surface_error(gate, sandbox, 500, "Internal server error (injected)", "exception")
                title = "502 Bad Gateway" if status == 502 else "504 Gateway Time-out"
                return Response(
                    f"<html><body><h1>{title}</h1></body></html>".encode(), status, media_type="text/html"
                )
            delay = sandbox.faults.delay()
            if delay:
                await asyncio.sleep(delay)
        return await handler(request)

    def _too_many(self, gate: Gate, ip: str) -> Response:
        sandbox = self.sandbox
        configured = sandbox.options.rate_limit[0] if sandbox.options.rate_limit else 7500
        headers = {"X-RateLimit-Limit": str(sandbox.limiter.limit or configured)}
        if sandbox.options.retry_after:
            headers["Retry-After"] = str(sandbox.limiter.retry_after(ip))
        return _surface_error(gate, sandbox, 429, "Rate limit exceeded", "throttled", headers)


def create_app(sandbox: Sandbox) -> Starlette:
    gate = _Gate(sandbox)

    # -- auth -----------------------------------------------------------------------------------

    async def token(request: Request) -> Response:
        async def handle(request: Request) -> Response:
            body = await request.body()
            form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
            audiences = auth.audiences_for(sandbox.base_url) + auth.audiences_for(str(request.base_url))
            try:
                grant = sandbox.auth.issue_oauth(
                    form, content_type=request.headers.get("content-type", ""), audiences=audiences
                )
            except auth.AuthError as err:
                return _json(err.body(), err.status)
            return _json(grant, headers={"Cache-Control": "no-store"})

        return await gate.run(request, "auth", f"POST {request.url.path}", handle)

    async def legacy(request: Request) -> Response:
        async def handle(request: Request) -> Response:
            try:
                body = json.loads(await request.body() or b"null")
            except ValueError:
                body = None
            if not isinstance(body, dict):
                return _json(
                    {
                        "error": "invalid_request",
                        "error_description": "JSON body required",
                        "error_uri": auth.ERROR_URI,
                    },
                    400,
                )
            try:
                if request.url.path.endswith("/refreshToken"):
                    grant = sandbox.auth.refresh_legacy(body.get("apiKey"), body.get("refreshToken"))
                else:
                    grant = sandbox.auth.issue_legacy(body.get("apiKey"), body.get("secret"))
            except auth.AuthError as err:
                return _json(err.body(), err.status)
            return _json(grant, headers={"Cache-Control": "no-store"})

        return await gate.run(request, "auth", f"POST {request.url.path}", handle)

    # -- FHIR -----------------------------------------------------------------------------------

    def fhir_template(request: Request, suffix: str) -> str:
        resource = request.path_params.get("resource", "")
        shown = resource if resource in RESOURCES else "{resource}"
        return f"{request.method} /fhir/R4/{{org}}/{{environment}}/{shown}{suffix}"

    def wrong_destination(request: Request) -> Response | None:
        org, environment = request.path_params["org"], request.path_params["environment"]
        if org != sandbox.options.org or environment != sandbox.options.environment:
            return _json(
                operation_outcome(
                    f"Unknown destination: this sandbox serves /fhir/R4/{sandbox.options.org}/"
                    f"{sandbox.options.environment}",
                    "not-found",
                ),
                404,
                media_type=FHIR_JSON,
            )
        return None

    async def fhir_search(request: Request) -> Response:
        async def handle(request: Request) -> Response:
            wrong = wrong_destination(request)
            if wrong is not None:
                return wrong
            try:
                pairs = await _form_pairs(request)
            except ValueError as err:
                return _json(operation_outcome(str(err)), 400, media_type=FHIR_JSON)
            page = sandbox.fhir.search(request.path_params["resource"], pairs)
            await sandbox.pacer.wait(sandbox.pacer.draw("fhir.search"))
            return _json(page.body, page.status, media_type=FHIR_JSON)

        suffix = "/_search" if request.url.path.endswith("/_search") else ""
        return await gate.run(request, "fhir", fhir_template(request, suffix), handle)

    async def fhir_read(request: Request) -> Response:
        async def handle(request: Request) -> Response:
            wrong = wrong_destination(request)
            if wrong is not None:
                return wrong
            page = sandbox.fhir.read(request.path_params["resource"], request.path_params["id"])
            await sandbox.pacer.wait(sandbox.pacer.draw("fhir.read"))
            return _json(page.body, page.status, media_type=FHIR_JSON)

        return await gate.run(request, "fhir", fhir_template(request, "/{id}"), handle)

    # -- Data Model -----------------------------------------------------------------------------

    def answer_in_worker(body: bytes) -> Answer:
        with sandbox.answering:
            return sandbox.datamodel.handle(body)

    async def endpoint(request: Request) -> Response:
        async def handle(request: Request) -> Response:
            body = await request.body()
            if sandbox.datamodel_worker is None:
                answer = sandbox.datamodel.handle(body)
            else:
                loop = asyncio.get_running_loop()
                answer = await loop.run_in_executor(sandbox.datamodel_worker, answer_in_worker, body)
            sandbox.stats.datamodel[answer.label] += 1
            await sandbox.pacer.wait(answer.wait)
            return _json(answer.body, answer.status)

        return await gate.run(request, "datamodel", "POST /endpoint", handle)

    # -- admin ----------------------------------------------------------------------------------

    async def advance(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
            units = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
            seconds = sum(float(body.get(name, 0)) * factor for name, factor in units.items())
        except (ValueError, TypeError, AttributeError):
            return _json({"error": 'body must be JSON like {"seconds": N} or {"days": N}'}, 400)
        if seconds <= 0:
            return _json({"error": "advance by a positive amount of time"}, 400)
        with sandbox.answering:
            changes = sandbox.world.advance(timedelta(seconds=seconds))
        store = sandbox.store()
        return _json({"changes": changes, "clock": store.clock.isoformat(), "head_seq": store.head_seq})

    async def truth(request: Request) -> Response:
        frames = sandbox.world.truth()
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for name, frame in frames.items():
                part = io.BytesIO()
                frame.write_parquet(part)
                archive.writestr(f"{name}.parquet", part.getvalue())
        return Response(
            buffer.getvalue(),
            media_type="application/zip",
            headers={"Content-Disposition": 'attachment; filename="truth.zip"'},
        )

    async def stats(request: Request) -> Response:
        return _json(sandbox.stats_body())

    async def stats_reset(request: Request) -> Response:
        sandbox.stats.reset()
        sandbox.limiter.reset_counters()
        sandbox.faults.reset_counters()
        sandbox.pacer.reset_counters()
        return _json(sandbox.stats_body())

    async def push(request: Request) -> Response:
        pusher = sandbox.pusher
        if pusher is None:
            return _json({"error": "no push subscription: start with --push-to URL"}, 404)
        return _json({**pusher.status(), "ledger": pusher.ledger()})

    async def health(request: Request) -> Response:
        return _json({"status": "ok"})

    async def not_found(request: Request) -> Response:
        async def handle(request: Request) -> Response:
            return _json({"error": "not_found", "error_description": "No such endpoint"}, 404)

        return await gate.run(request, "auth", f"{request.method} {{unknown}}", handle)

    fhir_prefix = "/fhir/R4/{org}/{environment}/{resource}"
    routes = [
        Route("/v2/auth/token", token, methods=["POST"]),
        Route("/oauth/token", token, methods=["POST"]),
        Route("/auth/authenticate", legacy, methods=["POST"]),
        Route("/auth/refreshToken", legacy, methods=["POST"]),
        Route(f"{fhir_prefix}/_search", fhir_search, methods=["GET", "POST"]),
        Route(fhir_prefix, fhir_search, methods=["GET"]),
        Route(f"{fhir_prefix}/{{id}}", fhir_read, methods=["GET"]),
        Route("/endpoint", endpoint, methods=["POST"]),
        Route("/sandbox/advance", advance, methods=["POST"]),
        Route("/sandbox/truth", truth, methods=["GET"]),
        Route("/sandbox/stats", stats, methods=["GET"]),
        Route("/sandbox/stats/reset", stats_reset, methods=["POST"]),
        Route("/sandbox/health", health, methods=["GET"]),
        Route("/sandbox/push", push, methods=["GET"]),
        Route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
    app = Starlette(routes=routes)
    app.state.sandbox = sandbox
    return app
