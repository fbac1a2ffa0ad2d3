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

# 40 requests/s over a 5 s window: the 300 requests below span about two windows.
LIMIT, WINDOW = 200, 5.0
# The budget stamps a request when it grants the slot; the sandbox counts it when it arrives. With
# ~30 requests granted together, the client's event loop sends the last of them a little later, so
# a short window needs more room than Redox's 300 s one (0.85 here: 30 requests, ~0.9 s of traffic).
MARGIN = 0.85
LATENCY_S = 0.5
SEARCHES, PATIENT_READS = 200, 100


async def test_latency_raises_requests_in_flight_but_never_the_rate(tmp_path):
    # Its own process, so the sandbox counts arrivals on its own clock and CPU, not the client's.
    with serve_in_subprocess(
        seed=5, patients=20, rate_limit=(LIMIT, WINDOW), faults=f"slow=1.0:{LATENCY_S:g}s"
    ) as running:
        settings = RedoxSettings.from_credentials(
            running.credentials_path,
            budget_path=tmp_path / "budget.sqlite",
            rate_limit=RateSpec(limit=LIMIT, seconds=WINDOW),
            rate_margin=MARGIN,
            read_timeout=30.0,
        )
        async with RedoxClient(settings, run_id="in-flight") as client:

            async def search(i: int) -> int:
                pages = 0
                async for _ in client.fhir.search("Patient", params={"_id": f"no-such-patient-{i}"}):
                    pages += 1
                return pages

            async def patient_read(i: int) -> None:
                await client.datamodel.patient_search(identifiers=[{"ID": f"nobody-{i}", "IDType": "MR"}])

            # Every call is started at once, as the extract fans them out: the transport alone bounds them.
            pages = await asyncio.gather(
                *(search(i) for i in range(SEARCHES)), *(patient_read(i) for i in range(PATIENT_READS))
            )
            in_flight = client.transport.in_flight_stats()
            calls = client.audit_frame()
        async with httpx.AsyncClient(timeout=10) as http:
            stats = (await http.get(f"{running.base_url}/sandbox/stats")).json()

    assert pages[:SEARCHES] == [1] * SEARCHES
    clinical = calls.filter(pl.col("surface") != "auth")
    assert clinical.height == SEARCHES + PATIENT_READS
    assert clinical.filter(pl.col("status") != 200).height == 0
    # The old fixed bound was 8; at 0.5 s and 34 requests/s about 26 are needed.
    assert in_flight.peak_on_wire > 8, in_flight
    assert in_flight.target > 8, in_flight
    # And the sandbox saw no more than its limit in any window, and refused nothing.
    assert stats["responses_429"] == 0
    assert stats["rate_limit"]["refused"] == 0
    assert max(stats["rate_limit"]["peak_in_window"].values()) <= LIMIT
