"""Lake maintenance: compact small files, expire old snapshots, delete files nothing references.

Invariant: maintenance never changes a table's contents, only how they are stored; it runs as the
writer (the lock guarantees no write is in flight, so an "orphan" file is truly a dead writer's),
and a file is deleted only after it has been unreferenced for ``delete_files_older_than``, so a
reader still scanning an older snapshot keeps its files.
"""

import dataclasses
import datetime as dt
import logging

import duckdb

from resources.warehouse.connection import LAKE
from resources.warehouse.transaction import Writer, current_snapshot, utcnow

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class MaintenanceReport:
    files_merged: int
    snapshots_expired: int
    files_deleted: int
    orphans_deleted: int
    snapshot_id: int | None


def maintain(
    writer: Writer, *, expire_older_than: dt.timedelta, delete_files_older_than: dt.timedelta
) -> MaintenanceReport:
    """Run the four DuckLake maintenance calls in order and count what each did."""
    now = utcnow()
    with writer() as con:
        merged = _count(con.execute(f"CALL ducklake_merge_adjacent_files('{LAKE}')"))
        expired = _count(
            con.execute(
                f"CALL ducklake_expire_snapshots('{LAKE}', older_than => ?)", [now - expire_older_than]
            )
        )
        deleted = _count(
            con.execute(
                f"CALL ducklake_cleanup_old_files('{LAKE}', older_than => ?)", [now - delete_files_older_than]
            )
        )
        # Files a killed writer wrote but never committed; the writer lock guarantees none is in flight.
        orphans = _count(
            con.execute(
                f"CALL ducklake_delete_orphaned_files('{LAKE}', older_than => ?)",
                [now - delete_files_older_than],
            )
        )
        snapshot = current_snapshot(con)
    report = MaintenanceReport(merged, expired, deleted, orphans, snapshot)
    log.info("warehouse maintenance: %s", dataclasses.asdict(report))
    return report


def _count(result: duckdb.DuckDBPyConnection) -> int:
    return len(result.fetchall())
