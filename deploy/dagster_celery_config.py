"""Celery settings for dagster-celery workers, read from the same environment as the orchestrator.

Start a worker from the project's root with this folder on the path (dagster_celery.app imports a
module of this name when it exists):

    PYTHONPATH=deploy uv run celery -A dagster_celery.app worker -Q dagster -n worker1@%h

Every name this module defines is a Celery setting (broker_url, result_backend, task_acks_late, ...).
"""

from pipelines.executors import celery_config
from resources.settings import Settings

globals().update(celery_config(Settings.from_env()))
