"""A hospital-volume day whose Data Model queries are too big for one answer lands whole.

The sandbox runs the hospital profile (about 20,000 Data Model results a day) with Redox's answer
limits scaled down: at most 4,000 records per answer (413 above) and a 1 s round trip (504 above;
the latency draw plus 0.05 ms per record). The day's Results.Query is refused, the extract asks
again in halves until each answer fits, and the lake's Data Model tables equal the sandbox's truth
for that day.
"""

import datetime as dt
import warnings

import dagster as dg
import httpx
import polars as pl
import pytest

from assets import all_assets
from resources import all_resources
from sandbox.server import serve_in_thread
from tests.pipeline.truth import assert_equal, expected

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DATAMODEL = dg.AssetSelection.assets(
    "dm_encounters",
    "dm_results",
    "dm_appointments",
    "dm_patients",
    "patients",
    "encounters",
    "results",
    "appointments",
)


def test_a_hospital_day_too_big_for_one_answer_lands_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path))
    monkeypatch.setenv("REDOX_BUDGET_PATH", str(tmp_path / "budget.sqlite"))
    # The day's ~1,500 patient searches are not what this test is about: a budget far above them.
    monkeypatch.setenv("REDOX_RATE_LIMIT", "100000/60")
    day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=3)
    with serve_in_thread(
        state_dir=tmp_path / "sandbox",
        profile="hospital",
        seed=11,
        start=day,
        end=day,
        rate_limit=None,
        max_response_records=4000,
        latency="datamodel.query=10ms/1500ms,record=0.05ms",
        round_trip_limit=1.0,
    ) as running:
        monkeypatch.setenv("REDOX_SANDBOX_CREDENTIALS", str(running.credentials_path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = dg.materialize(
                all_assets,
                selection=DATAMODEL,
                resources=all_resources(),
                instance=dg.DagsterInstance.ephemeral(),
                partition_key=day.isoformat(),
            )
        assert result.success
        stats = httpx.get(f"{running.base_url}/sandbox/stats", timeout=30).json()
        truth = running.world.truth()

    want = {
        table: frame.filter(pl.col("source_surface") == "datamodel")
        for table, frame in expected(truth, day, day).items()
    }
    assert want["results"].height >= 15_000  # hospital volume: one answer could not hold it
    # Seed 11 met 5 refusals and 2 timeouts; how many depends on the draws, that some came does not.
    assert stats["responses_413"] > 0
    assert stats["responses_413"] + stats["responses_504"] >= 3
    assert stats["datamodel_events"]["Results.Query"] > 1
    assert_equal(want, day, day)
