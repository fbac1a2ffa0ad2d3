"""The project's dagster.yaml: a Dagster instance built from it sends no telemetry and shows no
community pop-up (issue 13, item 9), and keeps the warehouse pool at one writer."""

import shutil
from pathlib import Path

import dagster as dg

REPO = Path(__file__).resolve().parents[2]


def test_the_instance_has_telemetry_and_the_pop_up_off(tmp_path: Path) -> None:
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.telemetry_enabled is False
        assert instance.nux_enabled is False
        assert instance.get_settings("concurrency")["pools"]["default_limit"] == 1


def test_the_queue_is_read_every_second_under_the_concurrency_block_limits(tmp_path: Path) -> None:
    for name in ("dagster.yaml", "deploy/dagster.yaml"):
        home = tmp_path / name.replace("/", "_")
        home.mkdir()
        shutil.copy(REPO / name, home / "dagster.yaml")
        if name.startswith("deploy"):
            # Only the storage differs; the queue settings are read without a Postgres server.
            text = (home / "dagster.yaml").read_text()
            (home / "dagster.yaml").write_text(
                text.split("storage:", 1)[0] + "concurrency:" + text.split("concurrency:", 1)[1]
            )
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert instance.run_coordinator.dequeue_interval_seconds == 1  # type: ignore[attr-defined]
            queue = instance.get_concurrency_config().run_queue_config
            assert queue is not None and queue.max_concurrent_runs == 6
