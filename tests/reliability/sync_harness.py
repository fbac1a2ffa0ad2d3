"""A real sync for the reliability tests: a sandbox on loopback, isolated state, a persistent Dagster
instance, and ``dg.materialize`` of every asset over a window of days.

Everything a run writes lands under one temp folder, laid out as a deployment would be:
``home/`` (REDOX_ETL_HOME: sandbox credentials, rate budget, ``lake/``) and ``dagster_home/``
(DAGSTER_HOME: run and event storage, compute logs), so a test can scan or watch all of it.
"""

import contextlib
import dataclasses
import datetime as dt
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from sandbox.server import Running, serve_in_thread

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class SyncEnv:
    root: Path
    home: Path
    dagster_home: Path
    running: Running
    instance: dg.DagsterInstance
    first: dt.date
    last: dt.date

    @property
    def lake(self) -> Path:
        return self.home / "lake"


def window(days: int, *, ago: int = 5) -> tuple[dt.date, dt.date]:
    """``days`` clinical days ending ``ago`` days before today (the sandbox's clock is now)."""
    last = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=ago)
    return last - dt.timedelta(days=days - 1), last


@contextlib.contextmanager
def sync_env(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    patients: int,
    days: int,
    seed: int = 21,
    faults: str | None = None,
) -> Iterator[SyncEnv]:
    first, last = window(days)
    home, dagster_home = root / "home", root / "dagster_home"
    dagster_home.mkdir(parents=True)
    # The instance settings `redox-etl sync` uses (the CLI copies this file into DAGSTER_HOME).
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.setenv("REDOX_ETL_HOME", str(home))
    monkeypatch.setenv("REDOX_BUDGET_PATH", str(home / "budget.sqlite"))
    for name in ("REDOX_BASE_URL", "REDOX_ETL_LAKE", "REDOX_LAKE_CATALOG", "REDOX_LAKE_DATA_PATH"):
        monkeypatch.delenv(name, raising=False)
    options: dict[str, Any] = {
        "patients": patients,
        "seed": seed,
        "start": first,
        "end": last,
        "rate_limit": None,
    }
    if faults:
        options["faults"] = faults
    with serve_in_thread(state_dir=home / "sandbox", **options) as running:
        monkeypatch.setenv("REDOX_SANDBOX_CREDENTIALS", str(running.credentials_path))
        with dg.DagsterInstance.get() as instance:
            yield SyncEnv(root, home, dagster_home, running, instance, first, last)


def materialize(
    env: SyncEnv,
    *,
    selection: Sequence[str] | None = None,
    first: dt.date | None = None,
    last: dt.date | None = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    """One run of every asset (or ``selection``) over the window, on the persistent instance."""
    from assets import all_assets
    from resources import all_resources

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dg.materialize(
            all_assets,
            selection=list(selection) if selection is not None else None,
            resources=all_resources(),
            instance=env.instance,
            tags={
                "dagster/asset_partition_range_start": (first or env.first).isoformat(),
                "dagster/asset_partition_range_end": (last or env.last).isoformat(),
            },
            raise_on_error=raise_on_error,
        )
