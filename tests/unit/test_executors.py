"""REDOX_ETL_EXECUTOR picks where steps run: in the run's process by default, Celery when asked,
with the broker named by variable (never by value) and late acknowledgement on both sides."""

import dagster as dg
import pytest

from pipelines.executors import celery_config, executor
from resources.settings import Settings, SettingsError


def test_the_default_is_in_process() -> None:
    assert executor(Settings.from_env({})) is dg.in_process_executor


def test_celery_needs_a_broker() -> None:
    with pytest.raises(SettingsError, match="REDOX_CELERY_BROKER"):
        executor(Settings.from_env({"REDOX_ETL_EXECUTOR": "celery"}))


def test_celery_is_chosen_by_configuration_and_holds_no_url() -> None:
    settings = Settings.from_env(
        {"REDOX_ETL_EXECUTOR": "celery", "REDOX_CELERY_BROKER": "redis://:pw-123@queue:6379/1"}
    )
    chosen = executor(settings)
    assert chosen.name == "celery"
    assert "pw-123" not in repr(chosen.__dict__)


def test_workers_and_orchestrator_share_late_acknowledgement() -> None:
    settings = Settings.from_env(
        {
            "REDOX_CELERY_BROKER": "redis://queue:6379/1",
            "REDOX_CELERY_VISIBILITY_TIMEOUT": "120",
        }
    )
    worker = celery_config(settings)
    assert worker["broker_url"] == worker["result_backend"] == "redis://queue:6379/1"
    assert worker["task_acks_late"] and worker["task_reject_on_worker_lost"]
    assert worker["worker_prefetch_multiplier"] == 1
    assert worker["broker_transport_options"] == {"visibility_timeout": 120}
    orchestrator = celery_config(settings, with_urls=False)
    assert "broker_url" not in orchestrator and "result_backend" not in orchestrator
