"""A backfill command ends when every target has landed, without waiting for the daemon's next tick,
and leaves the backfill recorded as the daemon would have: succeeded, ended, every target counted.

The materializations are reported straight to a real instance (no runs): what ``landed`` reads is
the instance's record of them, not how they were made.
"""

import time
from pathlib import Path

import dagster as dg
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
from dagster._core.storage.tags import BACKFILL_ID_TAG

from pipelines import runner
from pipelines.definitions import defs

KEYS = ["2026-11-08", "2026-11-09"]


def _materialize(inst: dg.DagsterInstance, key: dg.AssetKey, partition: str | None) -> None:
    inst.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition=partition))


def test_a_backfill_is_whole_only_when_every_target_landed_then_recorded_done(tmp_path: Path) -> None:
    with dg.DagsterInstance.local_temp(str(tmp_path)) as inst:
        backfill = runner.submit_backfill(inst, KEYS, title="test")
        graph = defs.resolve_asset_graph()
        targets = sorted(
            backfill.get_asset_backfill_data(graph).target_subset.iterate_asset_partitions(),
            key=lambda t: (t.asset_key.to_user_string(), t.partition_key or ""),
        )
        assert len({t.asset_key for t in targets}) == len(graph.get_all_asset_keys())
        assert not runner.landed(inst, backfill)
        # An unpartitioned asset materialized before the backfill began does not count for it.
        unpartitioned = [t for t in targets if t.partition_key is None]
        for target in unpartitioned:
            _materialize(inst, target.asset_key, None)
        time.sleep(0.01)
        later = runner.submit_backfill(inst, KEYS, title="later")
        partitioned = [t for t in targets if t.partition_key is not None]
        for target in partitioned[:-1]:
            _materialize(inst, target.asset_key, target.partition_key)
        assert not runner.landed(inst, later), "one partition is still missing"
        _materialize(inst, partitioned[-1].asset_key, partitioned[-1].partition_key)
        assert not runner.landed(inst, later), "its unpartitioned assets landed before it began"
        assert runner.landed(inst, backfill)
        for target in unpartitioned:
            _materialize(inst, target.asset_key, None)
        # A run of the backfill still going (its checks, say) keeps it open.
        going = DagsterRun(
            job_name="daily_sync", status=DagsterRunStatus.STARTED, tags={BACKFILL_ID_TAG: later.backfill_id}
        )
        inst.add_run(going)
        assert not runner.landed(inst, later), "a run of it is still going"
        inst.report_run_failed(going)
        assert runner.landed(inst, later)

        runner.mark_landed(inst, later.backfill_id)
        done = inst.get_backfill(later.backfill_id)
        assert done is not None and done.status == BulkActionStatus.COMPLETED_SUCCESS
        assert done.backfill_end_timestamp is not None
        data = done.get_asset_backfill_data(graph)
        assert data.materialized_subset == data.target_subset
        # A backfill the daemon already ended keeps the daemon's record.
        inst.update_backfill(inst.get_backfill(backfill.backfill_id).with_status(BulkActionStatus.CANCELED))  # type: ignore[union-attr]
        runner.mark_landed(inst, backfill.backfill_id)
        assert inst.get_backfill(backfill.backfill_id).status == BulkActionStatus.CANCELED  # type: ignore[union-attr]
