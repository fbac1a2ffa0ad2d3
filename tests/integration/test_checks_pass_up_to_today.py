"""Every asset check passes on a lake synced from the sandbox up to today, as ``make demo`` does.

Issue 13, item 4: the sandbox used to stamp ``source_updated_at`` at the coming UTC midnight, so
``timestamps_utc`` failed on all four tables right after the demo. This runs what the demo runs (a
sandbox with its default range, which ends today; a sync of its last days, today included) through
a real Dagster materialization with every check, and asserts each check passed.
"""

import datetime as dt
import warnings

import dagster as dg
import pytest

from assets import all_assets, all_checks
from resources import all_resources
from sandbox.server import serve_in_thread

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RANGE_TAGS = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def test_a_sync_up_to_today_passes_every_check(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path))
    monkeypatch.setenv("REDOX_BUDGET_PATH", str(tmp_path / "budget.sqlite"))
    monkeypatch.delenv("REDOX_ETL_LAKE", raising=False)
    # The sandbox's default range, as the demo starts it: its last day is today.
    with serve_in_thread(state_dir=tmp_path / "sandbox", patients=80, seed=5, rate_limit=None) as running:
        today = dt.datetime.now(dt.UTC).date()
        assert running.world.clock0 <= dt.datetime.now(dt.UTC)
        monkeypatch.setenv("REDOX_SANDBOX_CREDENTIALS", str(running.credentials_path))
        first = today - dt.timedelta(days=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = dg.materialize(
                [*all_assets, *all_checks],
                resources=all_resources(),
                instance=dg.DagsterInstance.ephemeral(),
                tags=dict(zip(RANGE_TAGS, (first.isoformat(), today.isoformat()), strict=True)),
                raise_on_error=False,
            )
    assert result.success
    evaluations = {
        (e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()
    }
    expected = {(c.asset_key.to_user_string(), c.name) for d in all_checks for c in d.check_specs}
    assert expected <= evaluations.keys(), sorted(expected - evaluations.keys())
    failed = {k: dict(e.metadata) for k, e in evaluations.items() if not e.passed}
    assert not failed, failed
    for table in ("patients", "encounters", "results", "appointments"):
        checked = evaluations[(table, "timestamps_utc")]
        assert checked.metadata["row_count"].value > 0, table
