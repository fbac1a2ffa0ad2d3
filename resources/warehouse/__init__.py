"""The warehouse layer: DuckLake (Parquet + SQLite/Postgres catalog) through DuckDB.

One writer at a time (Dagster pool ``warehouse`` plus a cross-process file lock), any number of
read-only readers that never wait for it. See resource.py for the invariants and
docs/operations.md ("Warehouse") for configuration.
"""

from resources.warehouse.catalog import CatalogSpec, parse_catalog, redact
from resources.warehouse.extensions import ExtensionUnavailableError, load_extensions
from resources.warehouse.lock import WriterBusyError
from resources.warehouse.resource import (
    LAKE,
    LakeNotFoundError,
    MaintenanceReport,
    MergeStats,
    SchemaMismatchError,
    Warehouse,
    lake_schemas,
)

__all__ = [
    "LAKE",
    "CatalogSpec",
    "ExtensionUnavailableError",
    "LakeNotFoundError",
    "MaintenanceReport",
    "MergeStats",
    "SchemaMismatchError",
    "Warehouse",
    "WriterBusyError",
    "lake_schemas",
    "load_extensions",
    "parse_catalog",
    "redact",
]
