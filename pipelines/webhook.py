"""The push lane's destination endpoint: Redox's webhook deliveries, stored durably before the 200.

``create_app(receiver)`` is a starlette app answering every path (a Redox destination names one URL):

- verification: ``GET ?challenge=..&verification-token=..`` and ``POST {"verification-token",
  "challenge"}`` get the challenge back as the whole body (the older documented form, which the newer
  "anywhere in the body" form also accepts);
- a delivery (``POST``, ``verification-token`` header) is checked in this order: token (missing 401,
  wrong 403, compared in constant time against every configured token), size (413 over the limit),
  JSON (400), then appended to the inbox (``resources.inbox``: committed with fsync) and only then
  answered 200. A store that fails answers 503, so Redox keeps the message and retries.

Invariants: a 200 means the delivery is on disk; a refusal is recorded (status, reason, size) without
its body; nothing logged or answered carries a token, a body or a value from one. Appends run on one
writer thread, in arrival order, so ``seq`` is the order deliveries arrived; deliveries waiting
together are committed together (group commit), each answered only after that commit.
"""

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import hmac
import json
import logging
import os
import queue
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from resources.inbox import Appended, Inbox, Incoming
from resources.settings import Settings
from transforms.deliveries import identify

log = logging.getLogger("redox_etl.webhook")

# Headers never stored: they carry the secret or credentials of whoever called.
SECRET_HEADERS = frozenset({"verification-token", "authorization", "cookie", "proxy-authorization"})


class TokenError(RuntimeError):
    """No usable verification token is configured; the message says what to set."""


class Tokens:
    """The accepted verification tokens: REDOX_WEBHOOK_TOKENS plus the lines of a 0600 token file,
    the file re-read when it changes, so a rotation needs no restart."""

    def __init__(self, fixed: list[str], file: Path | None) -> None:
        self._fixed = [t for t in fixed if t]
        self._file = file
        self._stamp: tuple[float, int] | None = None
        self._from_file: list[str] = []
        if not self.current():
            raise TokenError(
                "no verification token configured: set REDOX_WEBHOOK_TOKENS or REDOX_WEBHOOK_TOKEN_FILE "
                "(a 0600 file, one token per line) to the token of your Redox destination"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> "Tokens":
        fixed = settings.webhook_tokens.get_secret_value().split(",") if settings.webhook_tokens else []
        return cls([t.strip() for t in fixed], settings.webhook_token_file)

    def current(self) -> list[str]:
        if self._file is not None:
            info = self._file.stat()
            if stat.S_IMODE(info.st_mode) & 0o077:
                raise TokenError(
                    f"{self._file} is readable by others: chmod 600 it (it holds verification tokens)"
                )
            stamp = (info.st_mtime, info.st_size)
            if stamp != self._stamp:
                lines = self._file.read_text().splitlines()
                self._from_file = [line.strip() for line in lines if line.strip()]
                self._stamp = stamp
        return self._fixed + self._from_file

    def accepts(self, offered: str | None) -> bool:
        if not offered:
            return False
        given = offered.encode()
        # Every token is compared, whatever matched, so the time taken says nothing about them.
        matched = False
        for token in self.current():
            matched |= hmac.compare_digest(given, token.encode())
        return matched


Waiting = tuple[Incoming, "asyncio.Future[Appended]", asyncio.AbstractEventLoop]


@dataclasses.dataclass
class Receiver:
    inbox_path: Path
    tokens: Tokens
    max_body: int
    # Appends wait in arrival order for the one writer thread, which commits all that are waiting in
    # one transaction (group commit: one fsync answers many deliveries, each only after its commit).
    max_group: int = 256
    executor: concurrent.futures.ThreadPoolExecutor = dataclasses.field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inbox")
    )
    _inbox: Inbox | None = None
    _waiting: "queue.Queue[Waiting]" = dataclasses.field(default_factory=queue.Queue)
    _writer: threading.Thread | None = None

    def inbox(self) -> Inbox:
        if self._inbox is None:
            self._inbox = Inbox(self.inbox_path)
        return self._inbox

    async def run(self, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(**kwargs))

    async def append(self, item: Incoming) -> Appended:
        """Durably append ``item``; returns once its transaction committed (or raises)."""
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name="inbox-writer", daemon=True)
            self._writer.start()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Appended] = loop.create_future()
        self._waiting.put((item, done, loop))
        return await done

    def _write(self) -> None:
        while True:
            group = [self._waiting.get()]
            while len(group) < self.max_group:
                try:
                    group.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            try:
                stored: list[Appended] | BaseException = self.inbox().append_many([g[0] for g in group])
            except Exception as err:
                stored = err
            for i, (_, done, loop) in enumerate(group):
                loop.call_soon_threadsafe(
                    _settle, done, stored if isinstance(stored, BaseException) else stored[i]
                )


def _settle(done: "asyncio.Future[Appended]", outcome: Appended | BaseException) -> None:
    if done.cancelled():
        return
    if isinstance(outcome, BaseException):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_app(receiver: Receiver) -> Starlette:
    async def refuse(status: int, reason: str, size: int) -> Response:
        try:
            await receiver.run(
                receiver.inbox().reject, status=status, reason=reason, size=size, received_at=_now()
            )
        except Exception:
            log.warning("could not record a refused delivery (status %d)", status)
        log.info("refused delivery: %d %s (%d bytes)", status, reason, size)
        return JSONResponse({"error": reason}, status_code=status)

    async def read_body(request: Request) -> bytes | None:
        """The body, or None as soon as it passes the limit (the rest is not read)."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > receiver.max_body:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > receiver.max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def challenge_response(challenge: Any) -> Response:
        return PlainTextResponse(str(challenge))

    async def verify_get(request: Request) -> Response:
        challenge = request.query_params.get("challenge")
        if challenge is None:
            return await refuse(400, "GET without a challenge (deliveries are POSTs)", 0)
        offered = request.query_params.get("verification-token")
        if not receiver.tokens.accepts(offered):
            return await refuse(401 if not offered else 403, "verification with a bad token", 0)
        log.info("answered a verification request (GET)")
        return challenge_response(challenge)

    async def deliver(request: Request) -> Response:
        offered = request.headers.get("verification-token")
        if offered and not receiver.tokens.accepts(offered):
            return await refuse(
                403, "wrong verification-token", int(request.headers.get("content-length") or 0)
            )
        body = await read_body(request)
        if body is None:
            declared = request.headers.get("content-length") or "0"
            return await refuse(
                413, f"body over {receiver.max_body} bytes", int(declared) if declared.isdigit() else 0
            )
        try:
            parsed = json.loads(body)
        except ValueError:
            return await refuse(400, "body is not JSON", len(body))
        if (
            isinstance(parsed, dict)
            and "challenge" in parsed
            and "Meta" not in parsed
            and "resourceType" not in parsed
        ):
            body_token = parsed.get("verification-token")
            if not receiver.tokens.accepts(offered or (body_token if isinstance(body_token, str) else None)):
                return await refuse(
                    401 if not (offered or body_token) else 403, "verification with a bad token", len(body)
                )
            log.info("answered a verification request (POST)")
            return challenge_response(parsed["challenge"])
        if not offered:
            return await refuse(401, "missing verification-token", len(body))
        identity = identify(parsed, body)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in SECRET_HEADERS}
        try:
            appended = await receiver.append(
                Incoming(
                    body, headers, identity.key, identity.surface, identity.event, identity.attempt, _now()
                )
            )
        except Exception as err:
            log.error("inbox append failed (%s): answered 503", type(err).__name__)
            return JSONResponse({"error": "cannot store the delivery now; retry"}, status_code=503)
        log.debug(
            "stored delivery seq=%d event=%s redelivery=%s",
            appended.seq,
            identity.event,
            appended.duplicate_of is not None,
        )
        return JSONResponse(
            {"status": "stored", "seq": appended.seq, "redelivery": appended.duplicate_of is not None}
        )

    async def endpoint(request: Request) -> Response:
        if request.method == "GET":
            return await verify_get(request)
        return await deliver(request)

    app = Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])])
    app.state.receiver = receiver
    return app


def receiver_from_settings(settings: Settings, *, inbox: Path | None = None) -> Receiver:
    return Receiver(
        inbox_path=inbox or settings.inbox_file,
        tokens=Tokens.from_settings(settings),
        max_body=settings.webhook_max_body,
    )


def serve(
    receiver: Receiver,
    *,
    host: str,
    port: int,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Run the endpoint until signalled (uvicorn, one process: appends are serialized anyway)."""
    receiver.inbox()  # create the inbox (and fail here, not on the first delivery)
    config = uvicorn.Config(
        create_app(receiver),
        host=host,
        port=port,
        log_level="warning",
        # The access log prints query strings, and GET verification carries the token in one.
        access_log=False,
        lifespan="off",
        server_header=False,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        timeout_graceful_shutdown=5,
    )
    scheme = "https" if ssl_certfile else "http"
    announce(
        f"redox-etl webhook listening on {scheme}://{host}:{port} (inbox {receiver.inbox_path}, pid {os.getpid()})"
    )
    uvicorn.Server(config).run()
