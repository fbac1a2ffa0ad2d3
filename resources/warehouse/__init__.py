"""The warehouse layer: DuckLake (Parquet + SQLite/Postgres catalog) through DuckDB.

One writer at a time (Dagster pool ``warehouse`` plus a cross-process file lock), any number of
read-only readers that never wait for it. ``Warehouse`` (resource.py) is the public face; each
module behind it is named for its one job and states its invariant. docs/operations.md
("Warehouse") covers configuration.
"""

from resources.warehouse.catalog import CatalogSpec, parse_catalog, redact
from resources.warehouse.connection import LAKE, LakeNotFoundError
from resources.warehouse.extensions import ExtensionUnavailableError, load_extensions
from resources.warehouse.lock import WriterBusyError
from resources.warehouse.maintenance import MaintenanceReport
from resources.warehouse.merge import MergeStats
from resources.warehouse.migrate import SchemaMismatchError, lake_schemas
from resources.warehouse.resource import Warehouse

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
