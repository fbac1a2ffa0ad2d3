"""Dagster resources: clients and stores, never business rules.

``all_resources`` is where configuration meets Dagster: it reads ``resources.settings.Settings`` once
and binds what the environment sets to the resources, so the Dagster UI shows how each is configured.
Secrets are bound as ``dg.EnvVar`` (by name, never by value); a field left unset takes the
environment's value through ``Settings`` when the resource is used.
"""

from typing import Any

import dagster as dg

from resources.inbox import InboxResource
from resources.landing import LandingResource
from resources.redox.resource import RedoxResource
from resources.settings import Settings
from resources.warehouse import Warehouse


def all_resources(settings: Settings | None = None) -> dict[str, Any]:
    """The resources every asset may ask for, configured from ``settings`` (default: the environment)."""
    settings = Settings.from_env() if settings is None else settings
    # A Postgres conninfo may hold a password: Dagster keeps the variable's name, not its value.
    catalog = dg.EnvVar("REDOX_LAKE_CATALOG") if settings.lake_catalog is not None else None
    return {
        "redox": RedoxResource.from_settings(settings),
        "landing": LandingResource(root=_lake(settings)),
        "warehouse": _warehouse(settings, lake_dir=_lake(settings), catalog=catalog),
        "inbox": InboxResource(
            path=str(settings.inbox_file) if "webhook_inbox" in settings.model_fields_set else None
        ),
    }


def configured_warehouse(settings: Settings | None = None, *, lake_dir: str | None = None) -> Warehouse:
    """The warehouse the settings describe, for use outside Dagster (CLI, demo); ``lake_dir`` (e.g. a
    CLI option) wins over the settings."""
    settings = Settings.from_env() if settings is None else settings
    catalog = settings.lake_catalog.get_secret_value() if settings.lake_catalog is not None else None
    return _warehouse(settings, lake_dir=lake_dir or _lake(settings), catalog=catalog)


def _warehouse(settings: Settings, *, lake_dir: str | None, catalog: str | None) -> Warehouse:
    values: dict[str, Any] = {"lake_dir": lake_dir, "catalog": catalog, "data_path": settings.lake_data_path}
    return Warehouse(**{name: value for name, value in values.items() if value is not None})


def _lake(settings: Settings) -> str | None:
    # Unset, the lake follows REDOX_ETL_HOME when the resource is used, as a test that points the
    # home at a temp folder after the definitions were loaded expects.
    if {"etl_lake", "etl_home"} & settings.model_fields_set:
        return str(settings.lake)
    return None
