"""Changes since the watermark: a sync of only the newest days still brings older changed days in.

The sandbox's clock moves on (reschedules, cancellations, corrected results, entered-in-error
records, patients who move), then only the two new days are synced. ``redox_changes`` must queue
every older day whose records changed, a re-pull of the queued days must clear the queue, and the
whole window must then equal the sandbox's truth, as if every day had been re-pulled.
"""

import datetime as dt
import warnings
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from assets import all_assets
from pipelines import runner
from resources import all_resources
from resources.warehouse import Warehouse
from sandbox.server import serve_in_thread
from tests.pipeline.truth import CLINICAL_TIME, COMPARED, KEY, expected, lake_rows, referenced

pytestmark = [pytest.mark.slow, pytest.mark.integration]
# Identity is not what this test is about, and it is the slowest step of a run.
SELECTION = dg.AssetSelection.all() - dg.AssetSelection.groups("identity")


def _sync(first: dt.date, last: dt.date) -> dg.ExecuteInProcessResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dg.materialize(
            all_assets,
            selection=SELECTION,
            resources=all_resources(),
            instance=dg.DagsterInstance.ephemeral(),
            tags={
                "dagster/asset_partition_range_start": first.isoformat(),
                "dagster/asset_partition_range_end": last.isoformat(),
            },
        )
    assert result.success
    return result


def _queued(result: dg.ExecuteInProcessResult) -> int:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.path == ["redox_changes"]]
    materialization = event.step_materialization_data.materialization
    return int(materialization.metadata["queued"].value)  # type: ignore[arg-type]


def test_changes_on_older_days_are_queued_and_re_pulled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path))
    monkeypatch.setenv("REDOX_BUDGET_PATH", str(tmp_path / "budget.sqlite"))
    today = dt.datetime.now(dt.UTC).date()
    first, last = today - dt.timedelta(days=9), today - dt.timedelta(days=5)
    with serve_in_thread(
        state_dir=tmp_path / "sandbox", patients=120, seed=11, start=first, end=last, rate_limit=None
    ) as running:
        monkeypatch.setenv("REDOX_SANDBOX_CREDENTIALS", str(running.credentials_path))
        assert _queued(_sync(first, last)) == 0  # the first look only sets the watermark
        warehouse = Warehouse()
        assert warehouse.get_watermark("changes") is not None
        before = running.world.truth()

        changes = running.world.advance(dt.timedelta(days=2))
        assert sum(changes.values()) > 0
        new_first, new_last = last + dt.timedelta(days=1), last + dt.timedelta(days=2)
        queued = _queued(_sync(new_first, new_last))
        old_days = {d for d in warehouse.pending_partitions()["partition_day"] if d < new_first}
        assert queued > 0 and old_days, "no older day was queued although the sandbox changed records"

        queued_ranges = runner.pending_ranges()
        for start, end in queued_ranges:
            _sync(start, end)
        assert warehouse.pending_partitions().is_empty()

        # Bookings made ahead can queue days after the synced window: those days are pulled too, so
        # the lake must equal truth on exactly the days pulled.
        pulled = {first + dt.timedelta(days=n) for n in range((new_last - first).days + 1)}
        for start, end in queued_ranges:
            pulled |= {start + dt.timedelta(days=n) for n in range((end - start).days + 1)}
        resynced = {new_first, new_last}
        for start, end in queued_ranges:
            resynced |= {start + dt.timedelta(days=n) for n in range((end - start).days + 1)}
        _assert_equal_on(_dm_demographics_as_seen(running.world.truth(), before, resynced), pulled)


def _dm_demographics_as_seen(
    truth: dict[str, pl.DataFrame], before: dict[str, pl.DataFrame], resynced: set[dt.date]
) -> dict[str, pl.DataFrame]:
    """``truth`` with each Data Model patient that no re-synced day mentions as it was before the
    sandbox moved on: the Data Model reports no demographic changes (README, "Status"), so a sync
    learns them only from a day it pulls that mentions the patient."""
    mentioned = pl.concat(
        [
            truth[table]
            .filter(
                (pl.col("source_surface") == "datamodel") & pl.col(column).dt.date().is_in(sorted(resynced))
            )
            .select(pl.col("patient_source_id").alias("source_id"))
            for table, column in CLINICAL_TIME.items()
        ]
    )
    patients = truth["patients"]
    stale = (pl.col("source_surface") == "datamodel") & ~pl.col("source_id").is_in(
        mentioned["source_id"].implode()
    )
    old = before["patients"].filter(stale).select(patients.columns)
    kept = patients.join(old.select(KEY), on=KEY, how="anti")
    return {**truth, "patients": pl.concat([kept, old])}


def _assert_equal_on(truth: dict[str, pl.DataFrame], days: set[dt.date]) -> None:
    want = expected(truth, min(days), max(days))
    got = {table: lake_rows(Warehouse(), table, min(days), max(days)) for table in COMPARED}
    for table, column in CLINICAL_TIME.items():
        on_days = pl.col(column).dt.date().is_in(sorted(days))
        want[table], got[table] = want[table].filter(on_days), got[table].filter(on_days)
    clinical = {table: want[table] for table in CLINICAL_TIME}
    want["patients"] = want["patients"].join(referenced(clinical), on=KEY, how="semi")
    for table, columns in COMPARED.items():
        assert got[table].height == got[table].select(KEY).unique().height, f"{table}: duplicate keys"
        assert_frame_equal(
            got[table].sort(KEY),
            want[table].select(KEY + columns).sort(KEY),
            check_dtypes=False,
            check_exact=False,
        )
