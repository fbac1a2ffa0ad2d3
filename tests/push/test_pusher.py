"""The sandbox's pusher against a destination that fails on purpose: FIFO, one at a time, retried.

The destination here is a small recording app (the thing under test is the pusher): it answers 500
to the first try of every fifth message and checks that no message arrives while another is unanswered.
"""

import json
import threading
import time
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sandbox.server import serve_in_thread
from tests.push.harness import TOKEN, free_port

pytestmark = pytest.mark.integration


class Destination:
    def __init__(self) -> None:
        self.arrivals: list[dict[str, Any]] = []
        self.verified: list[str] = []
        self.in_flight = 0
        self.overlaps = 0
        self.failed_once: set[str] = set()

    def app(self) -> Starlette:
        async def endpoint(request: Request) -> Response:
            if request.method == "GET":
                self.verified.append("GET")
                return PlainTextResponse(request.query_params["challenge"])
            body = json.loads(await request.body())
            if "challenge" in body:
                self.verified.append("POST")
                return PlainTextResponse(body["challenge"])
            if request.headers.get("verification-token") != TOKEN:
                return Response(status_code=403)
            self.in_flight += 1
            if self.in_flight > 1:
                self.overlaps += 1
            try:
                key = _key(body)
                n = len(self.arrivals)
                self.arrivals.append({"key": key})
                if n % 5 == 4 and key not in self.failed_once:
                    self.failed_once.add(key)
                    return Response(status_code=500)
                return Response(status_code=200)
            finally:
                self.in_flight -= 1

        return Starlette(routes=[Route("/{p:path}", endpoint, methods=["GET", "POST"])])


def _key(body: dict[str, Any]) -> str:
    if "Meta" in body:
        return str(body["Meta"]["Logs"][0]["ID"])
    return str(body["entry"][0]["resource"]["id"])


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_pusher_verifies_then_delivers_fifo_one_at_a_time_with_retries(method: str) -> None:
    destination = Destination()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(destination.app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        with serve_in_thread(
            patients=40,
            seed=5,
            rate_limit=None,
            push_to=f"http://127.0.0.1:{port}/",
            push_token=TOKEN,
            push_verification=method,
            push_retry=(0.02, 0.1),
        ) as sandbox:
            httpx.post(f"{sandbox.base_url}/sandbox/advance", json={"days": 1}).raise_for_status()
            deadline = time.monotonic() + 60
            while True:
                status = httpx.get(f"{sandbox.base_url}/sandbox/push").json()
                if status["cursor_seq"] >= status["head_seq"] or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    ledger = status["ledger"]
    assert destination.verified == [method]
    assert status["cursor_seq"] == status["head_seq"] and len(ledger) > 10
    assert destination.overlaps == 0  # never a second message while one is unanswered
    # Acknowledged in write order, each once (no redelivery asked for here).
    assert [e["seq"] for e in ledger] == sorted(e["seq"] for e in ledger)
    assert len({e["log_id"] for e in ledger}) == len(ledger)
    # A failed message was retried before anything after it was sent: arrival order is FIFO.
    keys = [a["key"] for a in destination.arrivals]
    firsts = list(dict.fromkeys(keys))
    assert firsts == [e["log_id"] for e in ledger]
    retried = [e for e in ledger if e["attempts"] > 1]
    assert retried and status["failed_attempts"] == len(retried)
    for entry in retried:
        i = keys.index(entry["log_id"])
        assert keys[i + 1] == entry["log_id"]
