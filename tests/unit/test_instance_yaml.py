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
