"""The real client against a sandbox that enforces Redox's answer limits: a day's Results.Query that
is refused (413) or times out (504) comes back whole through split windows, and the transport
spends no retry on either (each refused window is one request)."""

import asyncio
from datetime import UTC, date, datetime, timedelta

import httpx
import polars as pl
import pytest

from resources.redox import RedoxClient, RedoxSettings
from resources.redox.settings import RateSpec
from sandbox.datamodel_render import wire_id
from sandbox.server import serve_in_thread

pytestmark = pytest.mark.integration

DAY = date.today() - timedelta(days=3)
START = datetime.combine(DAY, datetime.min.time(), UTC)
END = START + timedelta(days=1)


def _results(replies) -> list[str]:
    return sorted(
        f"{order['ID']}|{result['Code']}"
        for reply in replies
        for order in reply.json["Orders"]
        for result in order["Results"]
    )


@pytest.mark.parametrize(
    "limits",
    [
        {"max_response_records": 20},
        {"latency": "datamodel=1ms,record=10ms", "round_trip_limit": 0.3},
    ],
    ids=["413", "504"],
)
def test_a_refused_day_lands_whole_through_split_windows(tmp_path, limits):
    with serve_in_thread(patients=1000, seed=5, start=DAY, end=DAY, rate_limit=None, **limits) as running:
        settings = RedoxSettings.from_credentials(
            running.credentials_path,
            budget_path=tmp_path / "budget.sqlite",
            rate_limit=RateSpec(limit=100_000, seconds=60),
            read_timeout=10.0,
        )

        async def fetch():
            async with RedoxClient(settings) as client:
                return await client.datamodel.windowed("Results.Query", start=START, end=END)

        replies = asyncio.run(fetch())
        stats = httpx.get(f"{running.base_url}/sandbox/stats", timeout=10).json()
        truth = running.world.truth()["results"]
    want = truth.filter(
        (pl.col("source_surface") == "datamodel")
        & pl.col("effective_at").is_between(START, END, closed="left")
    )
    assert len(replies) > 1
    # The store keys a reused Order ID apart; the wire sends the id as Redox would.
    assert _results(replies) == sorted(wire_id(s) for s in want["source_id"].to_list())
    refused = stats["responses_413"] + stats["responses_504"]
    assert refused >= 1
    # One request per window asked: the answered ones and the refused ones, no retries.
    assert sum(stats["requests"]["by_endpoint"]["POST /endpoint"].values()) == len(replies) + refused
