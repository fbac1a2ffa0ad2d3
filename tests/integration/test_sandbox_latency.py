"""The latency model and Redox's answer limits on a live sandbox: waits do not block the server,
an oversized Data Model answer gets 413 and a too-long round trip 504, both in Redox's shape, and
/sandbox/stats counts them."""

import asyncio
import json
from collections.abc import Callable
from datetime import date, timedelta

import httpx
import pytest

from sandbox.app import SandboxOptions
from sandbox.server import Running, cli_args, serve_in_thread

pytestmark = pytest.mark.integration

Bearer = Callable[[Running], dict[str, str]]
DAY = date.today() - timedelta(days=3)


def _stats(running: Running) -> dict:
    return httpx.get(f"{running.base_url}/sandbox/stats", timeout=10).json()


def _results_query(running: Running, headers: dict[str, str]) -> httpx.Response:
    body = {
        "Meta": {"DataModel": "Results", "EventType": "Query"},
        "Completion": {
            "StartDateTime": f"{DAY.isoformat()}T00:00:00Z",
            "EndDateTime": f"{(DAY + timedelta(days=1)).isoformat()}T00:00:00Z",
        },
    }
    return httpx.post(f"{running.base_url}/endpoint", json=body, headers=headers, timeout=30)


def test_many_answers_wait_at_once(bearer: Bearer):
    """120 FHIR reads that each wait a fixed second are all waiting together: the waits hold no
    thread, so the server keeps accepting and answering while every answer waits."""
    with serve_in_thread(patients=30, seed=3, rate_limit=None, latency="fhir=1s") as running:
        headers = bearer(running)
        url = f"{running.credentials['fhir_base']}/Patient/nope"

        async def burst() -> list[int]:
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
            async with httpx.AsyncClient(limits=limits, timeout=60) as client:
                replies = await asyncio.gather(*(client.get(url, headers=headers) for _ in range(120)))
            return [r.status_code for r in replies]

        statuses = asyncio.run(burst())
        stats = _stats(running)
    assert statuses == [404] * 120
    assert stats["latency"]["peak_waiting"] >= 100
    assert stats["latency"]["waiting"] == 0
    assert stats["latency"]["spec"].startswith("fhir.read=1s/1s")


def test_an_oversized_answer_is_refused_with_413_in_redox_shape(bearer: Bearer):
    with serve_in_thread(
        patients=1000, seed=5, start=DAY, end=DAY, rate_limit=None, max_response_records=3
    ) as running:
        headers = bearer(running)
        refused = _results_query(running, headers)
        stats = _stats(running)
    assert refused.status_code == 413
    errors = refused.json()["Meta"]["Errors"]
    assert len(errors) == 1 and errors[0]["Text"].startswith("Payload too large")
    assert "more than the limit of 3" in errors[0]["Text"]
    assert stats["responses_413"] == 1
    assert stats["limits"] == {
        "max_response_records": 3,
        "round_trip_limit": 120.0,
        "refused_oversize": 1,
        "round_trip_timeouts": 0,
    }


def test_a_round_trip_over_the_limit_ends_in_504_in_redox_shape(bearer: Bearer):
    with serve_in_thread(
        patients=1000,
        seed=5,
        start=DAY,
        end=DAY,
        rate_limit=None,
        latency="datamodel=10ms,record=100ms",
        round_trip_limit=0.5,
    ) as running:
        headers = bearer(running)
        late = _results_query(running, headers)
        stats = _stats(running)
    assert late.status_code == 504
    assert late.json()["Meta"]["Errors"][0]["Text"].startswith("Timeout: the destination did not answer")
    assert stats["responses_504"] == 1 and stats["limits"]["round_trip_timeouts"] == 1
    assert stats["rate_limit"]["peak"] >= 2  # the token request and the query


def test_a_small_answer_is_not_limited(bearer: Bearer):
    with serve_in_thread(patients=1000, seed=5, start=DAY, end=DAY, rate_limit=None) as running:
        answer = _results_query(running, bearer(running))
    assert answer.status_code == 200
    assert "Errors" not in answer.json()["Meta"] and answer.json()["Orders"]


def test_cli_args_carry_the_new_options(tmp_path):
    options = SandboxOptions(
        profile="clinic", latency="realistic", max_response_records=200, round_trip_limit=1.5
    )
    args = cli_args(options, state_dir=tmp_path)
    pairs = dict(zip(args[::2], args[1::2], strict=False))
    assert args[args.index("--profile") + 1] == "clinic"
    assert args[args.index("--latency") + 1] == "realistic"
    assert args[args.index("--max-response-records") + 1] == "200"
    assert args[args.index("--round-trip-limit") + 1] == "1.5"
    assert json.dumps(pairs)  # every flag has its value
