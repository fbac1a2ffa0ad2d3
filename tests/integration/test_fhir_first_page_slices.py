"""A FHIR day with no landed neighbour is searched whole; when the first page's Bundle.total says
its paging would be a long chain, the day is asked again in slices (the first page set aside and
counted), and what lands is every match of the day exactly once."""

import asyncio
import json
from datetime import UTC, date, datetime, timedelta

import httpx
import polars as pl
import pytest

from assets.extract import PAGES_PER_SLICE, _fetch_clinical
from resources.redox import RedoxClient, RedoxSettings
from resources.redox.settings import RateSpec
from sandbox.server import serve_in_thread
from transforms.streams import stream

pytestmark = pytest.mark.integration

DAY = date.today() - timedelta(days=3)
START = datetime.combine(DAY, datetime.min.time(), UTC)
END = START + timedelta(days=1)


def _fetch(tmp_path, running, entity: str, page_size: int):
    settings = RedoxSettings.from_credentials(
        running.credentials_path,
        budget_path=tmp_path / "budget.sqlite",
        rate_limit=RateSpec(limit=100_000, seconds=60),
        fhir_page_size=page_size,
        fhir_day_slices=4,
    )

    async def fetch():
        async with RedoxClient(settings) as client:
            return await _fetch_clinical(client, stream("fhir", entity), DAY, windows=1)

    return asyncio.run(fetch())


def _ids(pages) -> list[str]:
    return [e["resource"]["id"] for p in pages for e in json.loads(p.body).get("entry") or []]


def _searches(stats) -> int:
    """POSTed searches (a page after the first is a GET of its next link)."""
    by_endpoint = stats["requests"]["by_endpoint"]
    return sum(sum(v.values()) for k, v in by_endpoint.items() if k.startswith("POST") and "_search" in k)


def test_a_busy_day_without_a_neighbour_is_asked_again_in_slices(tmp_path):
    with serve_in_thread(patients=1000, seed=5, start=DAY, end=DAY, rate_limit=None) as running:
        truth = running.world.truth()["results"]
        want = truth.filter(
            (pl.col("source_surface") == "fhir")
            & pl.col("effective_at").is_between(START, END, closed="left")
            # A component is a row of the table, not a resource of the search.
            & pl.col("parent_source_id").is_null()
        )
        # Pages of 2: more than 3 x PAGES_PER_SLICE pages, so the day is worth 4 slices.
        assert want.height > 2 * PAGES_PER_SLICE * 3
        pages, extra, _ = _fetch(tmp_path, running, "results", 2)
        stats = httpx.get(f"{running.base_url}/sandbox/stats", timeout=10).json()
    assert extra["probe_pages"] == 1
    assert extra["bundle_total"] == extra["entries"] == want.height
    ids = _ids(pages)
    assert len(ids) == len(set(ids)) == want.height
    # The first page was asked and set aside: one search more than the four slices.
    assert _searches(stats) == 5


def test_a_quiet_day_stays_one_search_and_keeps_its_first_page(tmp_path):
    with serve_in_thread(patients=1000, seed=5, start=DAY, end=DAY, rate_limit=None) as running:
        pages, extra, _ = _fetch(tmp_path, running, "appointments", 200)
        stats = httpx.get(f"{running.base_url}/sandbox/stats", timeout=10).json()
    assert extra["probe_pages"] == 0
    assert extra["bundle_total"] == extra["entries"] == len(_ids(pages))
    assert _searches(stats) == 1
