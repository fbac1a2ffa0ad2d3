"""Both lanes at once: a window pulled by the daily sync and pushed by the sandbox converges to truth.

The sandbox's pusher delivers every change to the real receiver (in a thread, real HTTP) while the
pull syncs the same days through Dagster. Round 1 loads the pushed deliveries before the pull
re-reads the window; round 2 pulls first and loads the push after. Either way every table must equal
the sandbox's truth for the pulled window and for every pushed record, each key once.
"""

import datetime as dt
import time
import warnings
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from assets import all_assets
from resources import all_resources
from resources.warehouse import Warehouse
from sandbox.server import serve_in_thread
from tests.pipeline.truth import COMPARED, KEY, expected
from tests.push.expect import expected_rows
from tests.push.harness import TOKEN, receiver_in_thread

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _run(
    instance: dg.DagsterInstance,
    selection: list[str],
    first: dt.date | None = None,
    last: dt.date | None = None,
) -> dg.ExecuteInProcessResult:
    tags = {}
    if first and last:
        tags = {
            "dagster/asset_partition_range_start": first.isoformat(),
            "dagster/asset_partition_range_end": last.isoformat(),
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dg.materialize(
            all_assets, selection=selection, resources=all_resources(), instance=instance, tags=tags
        )
    assert result.success
    return result


def _pull(instance: dg.DagsterInstance, first: dt.date, last: dt.date) -> None:
    # The extract is one multi-asset (eight keys); the loads are one asset each.
    selection = [k.to_user_string() for a in all_assets if a.partitions_def is not None for k in a.keys]
    _run(instance, selection, first, last)


def _push(instance: dg.DagsterInstance) -> dict[str, Any]:
    result = _run(instance, ["pushed_deliveries"])
    [event] = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.step_materialization_data.materialization.metadata.items()}


def _drain(base_url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        status = httpx.get(f"{base_url}/sandbox/push", timeout=30).json()
        if status["cursor_seq"] >= status["head_seq"] or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def _assert_converged(
    truth: dict[str, pl.DataFrame], ledger: list[dict[str, Any]], first: dt.date, last: dt.date
) -> int:
    """Lake == truth over (pulled window) + (pushed records); returns how many keys both lanes brought."""
    pulled = expected(truth, first, last)
    warehouse = Warehouse()
    both = 0
    for table, columns in COMPARED.items():
        pushed = expected_rows(ledger, truth, table)
        both += pushed.join(pulled[table].select(KEY), on=KEY).height
        want = pl.concat([pulled[table].select(KEY + columns), pushed], how="vertical_relaxed").unique(
            subset=KEY
        )
        got = warehouse.query(f"SELECT {', '.join(KEY + columns)} FROM {table}")
        assert got.height == got.select(KEY).unique().height, f"{table}: duplicate keys"
        assert_frame_equal(got.sort(KEY), want.sort(KEY), check_dtypes=False, check_exact=False)
    return both


def test_pulled_and_pushed_window_converges_whichever_lane_comes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, dagster_home = tmp_path / "home", tmp_path / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(
        (Path(__file__).resolve().parents[2] / "dagster.yaml").read_text()
    )
    for name in ("REDOX_BASE_URL", "REDOX_ETL_LAKE", "REDOX_LAKE_CATALOG", "REDOX_WEBHOOK_INBOX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDOX_ETL_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.setenv("REDOX_BUDGET_PATH", str(home / "budget.sqlite"))
    today = dt.datetime.now(dt.UTC).date()
    first, last = today - dt.timedelta(days=6), today - dt.timedelta(days=4)
    with (
        receiver_in_thread(home / "inbox" / "inbox.sqlite") as url,
        serve_in_thread(
            state_dir=home / "sandbox",
            patients=60,
            seed=13,
            start=first,
            end=last,
            rate_limit=None,
            push_to=url,
            push_token=TOKEN,
            push_retry=(0.05, 0.5),
            push_redeliver=0.05,
        ) as running,
        dg.DagsterInstance.get() as instance,
    ):
        monkeypatch.setenv("REDOX_SANDBOX_CREDENTIALS", str(running.credentials_path))

        # Round 1: the push lane is loaded first, then the pull reads the window and the new day.
        running.world.advance(dt.timedelta(days=1))
        _drain(running.base_url)
        first_push = _push(instance)
        _pull(instance, first, last + dt.timedelta(days=1))
        status = _drain(running.base_url)
        both_1 = _assert_converged(
            running.world.truth(), status["ledger"], first, last + dt.timedelta(days=1)
        )

        # Round 2: the pull of the new day comes first, the pushed deliveries are loaded after it
        # (changes to older days reach the lake by push alone).
        running.world.advance(dt.timedelta(days=1))
        _drain(running.base_url)
        _pull(instance, last + dt.timedelta(days=1), last + dt.timedelta(days=2))
        second_push = _push(instance)
        status = _drain(running.base_url)
        both_2 = _assert_converged(
            running.world.truth(), status["ledger"], first, last + dt.timedelta(days=2)
        )

    assert first_push["deliveries"] > 0 and second_push["deliveries"] > 0
    assert first_push["redeliveries"] + second_push["redeliveries"] > 0
    # The lanes really overlapped: records brought by both, and the push met pulled versions.
    assert both_1 > 0 and both_2 > 0
    assert second_push["updated"] + second_push["ignored_older"] > 0
