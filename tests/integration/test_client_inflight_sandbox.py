"""Against a real sandbox that answers every clinical request 0.5 s late and limits the rate: the
client keeps many more than 8 requests in flight and still never passes the limit.

The sandbox is the judge of the rate: its own count of the most requests one IP sent inside one
rolling window, and the 429s it sent. The client's in-flight counter is the judge of concurrency
(requests on the wire at once, between the budget's grant and the end of the body). Nothing here
measures time.
"""

import asyncio

import httpx
import polars as pl
import pytest

from resources.redox import RedoxClient, RedoxSettings
from resources.redox.settings import RateSpec
from sandbox.server import serve_in_subprocess

pytestmark = pytest.mark.integration

# 40 requests/s over a 5 s window: the 300 requests of a test span about two windows.
LIMIT, WINDOW = 200, 5.0
# The budget stamps a request when it grants the slot; the sandbox counts it when it arrives. With
# ~30 requests granted together, the client's event loop sends the last of them a little later, so
# a short window needs more room than Redox's 300 s one (0.85 here: 30 requests, ~0.9 s of traffic).
MARGIN = 0.85
LATENCY_S = 0.5
REQUESTS = 300


async def _spend(running, budget_path, *, run_id: str, first: int, count: int):
    """``count`` calls started at once through one client (two thirds FHIR searches, one third Data
    Model patient reads), as the extract fans them out: the transport alone bounds them."""
    settings = RedoxSettings.from_credentials(
        running.credentials_path,
        budget_path=budget_path,
        rate_limit=RateSpec(limit=LIMIT, seconds=WINDOW),
        rate_margin=MARGIN,
        read_timeout=30.0,
    )
    async with RedoxClient(settings, run_id=run_id) as client:

        async def search(i: int) -> int:
            pages = 0
            async for _ in client.fhir.search("Patient", params={"_id": f"no-such-patient-{i}"}):
                pages += 1
            return pages

        async def patient_read(i: int) -> int:
            await client.datamodel.patient_search(identifiers=[{"ID": f"nobody-{i}", "IDType": "MR"}])
            return 1

        ids = range(first, first + count)
        answers = await asyncio.gather(*(search(i) if i % 3 else patient_read(i) for i in ids))
        assert answers == [1] * count
        return client.in_flight_stats(), client.audit_frame()


async def _sandbox_stats(running) -> dict:
    async with httpx.AsyncClient(timeout=10) as http:
        return (await http.get(f"{running.base_url}/sandbox/stats")).json()


def _served(stats: dict) -> None:
    """The sandbox saw no more than its limit in any window, and refused nothing."""
    assert stats["responses_429"] == 0
    assert stats["rate_limit"]["refused"] == 0
    assert max(stats["rate_limit"]["peak_in_window"].values()) <= LIMIT


def _sandbox():
    # Its own process, so the sandbox counts arrivals on its own clock and CPU, not the client's.
    return serve_in_subprocess(
        seed=5, patients=20, rate_limit=(LIMIT, WINDOW), faults=f"slow=1.0:{LATENCY_S:g}s"
    )


async def test_latency_raises_requests_in_flight_but_never_the_rate(tmp_path):
    with _sandbox() as running:
        in_flight, calls = await _spend(
            running, tmp_path / "budget.sqlite", run_id="one", first=0, count=REQUESTS
        )
        stats = await _sandbox_stats(running)
    clinical = calls.filter(pl.col("surface") != "auth")
    assert clinical.height == REQUESTS
    assert clinical.filter(pl.col("status") != 200).height == 0
    # The old fixed bound was 8; at 0.5 s and 34 requests/s about 26 are needed.
    assert in_flight.peak_on_wire > 8, in_flight
    assert in_flight.target > 8, in_flight
    _served(stats)


async def test_two_clients_each_sized_to_the_whole_budget_share_it_without_a_429(tmp_path):
    """Two runs (own clients, own budget handles on one file, as two processes have) each size their
    bound to the whole budget; the excess waits at the shared budget, which keeps the limit."""
    with _sandbox() as running:
        results = await asyncio.gather(
            *(
                _spend(
                    running,
                    tmp_path / "budget.sqlite",
                    run_id=f"run-{n}",
                    first=n * REQUESTS,
                    count=REQUESTS // 2,
                )
                for n in range(2)
            )
        )
        stats = await _sandbox_stats(running)
    for in_flight, calls in results:
        clinical = calls.filter(pl.col("surface") != "auth")
        assert clinical.height == REQUESTS // 2
        assert clinical.filter(pl.col("status") != 200).height == 0
        assert in_flight.target > 8, in_flight
    _served(stats)
