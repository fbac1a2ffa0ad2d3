"""The backfill command's daemon differs from ``dagster-daemon run`` only in two intervals, which
Dagster must still read where this module sets them."""

import inspect

import dagster._daemon.backfill as backfill_loop
import dagster._daemon.controller as controller
import pytest

from pipelines import command_daemon


def test_dagster_reads_both_intervals_at_each_use() -> None:
    # Read at use, not bound at import: a value set before the daemon starts is the one it runs with.
    assert "DEFAULT_DAEMON_INTERVAL_SECONDS" in inspect.getsource(
        backfill_loop.execute_backfill_iteration_loop
    )
    freshness = inspect.getsource(controller.DagsterDaemonController.check_workspace_freshness)
    assert "RELOAD_WORKSPACE_INTERVAL" in freshness


def test_configure_sets_the_intervals(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in command_daemon.INTERVALS:
        monkeypatch.setattr(controller, name, getattr(controller, name))
    command_daemon.configure()
    assert controller.DEFAULT_DAEMON_INTERVAL_SECONDS == command_daemon.BACKFILL_TICK_S
    assert controller.RELOAD_WORKSPACE_INTERVAL == command_daemon.RELOAD_WORKSPACE_S


def test_a_renamed_interval_stops_the_daemon_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(controller, "RELOAD_WORKSPACE_INTERVAL")
    with pytest.raises(SystemExit, match="RELOAD_WORKSPACE_INTERVAL"):
        command_daemon.configure()
