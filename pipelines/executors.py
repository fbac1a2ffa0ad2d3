"""Where a run's steps execute, chosen by ``REDOX_ETL_EXECUTOR``: in the run's process, or on Celery.

``in_process`` (the default) runs every step of a run in the run's own process: extraction is async
fan-out inside a step, and on one machine process start-up would otherwise dominate a day's work.
``celery`` hands each step to a Celery worker (dagster-celery, broker and result backend from
``REDOX_CELERY_BROKER``/``REDOX_CELERY_BACKEND``), so the extract steps of one run may run on
different machines. The workers read the same configuration through deploy/dagster_celery_config.py,
which calls ``celery_config`` here, so the orchestrator and its workers never disagree.

Invariants:
- the executor never weakens the single writer: Dagster's pool ``warehouse`` is claimed by the run's
  orchestrator in the instance's storage (Postgres when shared) before a load step is sent to any
  worker, and the lake's writer lock (resources/warehouse/lock.py) holds across machines besides;
- a step whose worker dies before finishing is handed to another worker, not lost: tasks are
  acknowledged late and rejected when their worker is lost, and the broker redelivers an unacknowledged
  one after ``REDOX_CELERY_VISIBILITY_TIMEOUT`` (steps are idempotent: a landed day is replaced, a
  loaded one skipped);
- broker URLs are secrets: the executor's config names the variables, never their values.
"""

import importlib
from typing import Any

import dagster as dg

from resources.settings import Settings, SettingsError


def executor(settings: Settings) -> dg.ExecutorDefinition:
    """The executor the settings choose, for ``Definitions(executor=...)``."""
    if settings.executor == "in_process":
        return dg.in_process_executor
    if settings.celery_broker is None:
        raise SettingsError(
            "REDOX_ETL_EXECUTOR=celery needs REDOX_CELERY_BROKER (e.g. redis://queue.internal:6379/1), "
            "the broker the Celery workers listen on; see docs/operations.md"
        )
    try:
        dagster_celery = importlib.import_module("dagster_celery")
    except ImportError as exc:
        raise SettingsError(
            "REDOX_ETL_EXECUTOR=celery needs dagster-celery: `uv sync --frozen --extra distributed`"
        ) from exc
    backend = "REDOX_CELERY_BACKEND" if settings.celery_backend is not None else "REDOX_CELERY_BROKER"
    configured: dg.ExecutorDefinition = dagster_celery.celery_executor.configured(
        {
            # By name, resolved when a run starts: the URLs never enter the run's stored config.
            "broker": {"env": "REDOX_CELERY_BROKER"},
            "backend": {"env": backend},
            "config_source": celery_config(settings, with_urls=False),
        },
        name="celery",
    )
    return configured


def celery_config(settings: Settings, *, with_urls: bool = True) -> dict[str, Any]:
    """Celery's own settings for the orchestrator and its workers (lower-case Celery names)."""
    config: dict[str, Any] = {
        # Late acknowledgement: a worker that dies mid-step leaves its task on the broker for another.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One step at a time per worker process: a worker that prefetched four steps and died would
        # delay all four by the visibility timeout.
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {"visibility_timeout": settings.celery_visibility_timeout},
        "result_expires": 24 * 3600,
    }
    if with_urls and settings.celery_broker is not None:
        broker = settings.celery_broker.get_secret_value()
        config["broker_url"] = broker
        backend = settings.celery_backend
        config["result_backend"] = backend.get_secret_value() if backend is not None else broker
    return config
