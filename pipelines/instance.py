"""The project's one persistent Dagster instance: where it lives, its settings, its safe creation.

Every entry point (``redox-etl sync``/``backfill``/``demo``, ``make ui`` and the schedules and
sensors its daemon runs) uses the folder ``Settings.dagster_dir`` resolves: ``DAGSTER_HOME`` when it
is set, else ``$REDOX_ETL_HOME/dagster``. ``python -m pipelines.instance`` prepares it and prints its
path, which is how the Makefile learns it without a default of its own.

Invariants:
- the project's ``dagster.yaml`` (pools, run limits, telemetry off) is in place before any process
  opens the instance, copied atomically, and a user's own edited copy is never overwritten;
- the instance's SQLite storages are created and migrated under a file lock in the folder, so
  several processes starting at once on a fresh home never race on creating them;
- the extract pool has a limit before any run can claim it (``EXTRACT_POOL_LIMIT`` unless someone
  set another), so the yaml's default limit of 1, meant for the writer, never serializes extracts.
"""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Final

import dagster as dg
import filelock

from assets.partitions import EXTRACT_POOL, EXTRACT_POOL_LIMIT
from resources import settings

ROOT: Final = Path(__file__).resolve().parent.parent
LOCK_FILE: Final = ".instance.lock"
# Creating the storages takes a second or two; a minute means something else holds the lock.
LOCK_TIMEOUT_S: Final = 120.0


def prepare() -> Path:
    """The instance folder, created (owner-only: run logs can name days and counts) with the project's
    dagster.yaml and its storages; also sets ``DAGSTER_HOME`` for this process and its children."""
    home = settings.dagster_home()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    with filelock.FileLock(home / LOCK_FILE, mode=0o600, timeout=LOCK_TIMEOUT_S):
        if not (home / "dagster.yaml").exists():
            _copy_atomically(ROOT / "dagster.yaml", home / "dagster.yaml")
        # Opening the instance creates and stamps the run, event log and schedule storages: the
        # step that fails with "UNIQUE constraint failed" when two processes do it at once.
        with dg.DagsterInstance.get() as created:
            created.get_runs(limit=1)
            created.all_instigator_state()
            storage = created.event_log_storage
            # The extract pool gets its own limit (the yaml's default_limit, 1, is the writer's);
            # a limit someone set (`dagster instance concurrency set`) is theirs to keep.
            if EXTRACT_POOL not in storage.get_concurrency_keys():
                storage.set_concurrency_slots(EXTRACT_POOL, EXTRACT_POOL_LIMIT)
    return home


def get() -> dg.DagsterInstance:
    """The persistent instance, prepared (``prepare``) before it is opened."""
    prepare()
    return dg.DagsterInstance.get()


def _copy_atomically(source: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    print(prepare())
