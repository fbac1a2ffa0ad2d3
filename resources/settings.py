"""Where redox-etl keeps its state on this machine, from one environment variable.

Everything the project writes (sandbox credentials, the shared rate budget, the landing zone and the
lake) lives under ``REDOX_ETL_HOME`` (default ``./.redox-etl``), so one variable moves or isolates a
whole deployment, and a test isolates itself by pointing it at a temp folder.
"""

import os
from pathlib import Path


def home() -> Path:
    """The state folder, created on first use with owner-only permissions (it holds credentials)."""
    path = Path(os.environ.get("REDOX_ETL_HOME", ".redox-etl")).resolve()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def sandbox_dir() -> Path:
    """Where `redox-etl sandbox serve` writes credentials.json unless --state-dir says otherwise."""
    return home() / "sandbox"


def lake_dir() -> Path:
    """The default DuckLake location: catalog, Parquet data files and the raw landing zone."""
    return Path(os.environ.get("REDOX_ETL_LAKE", str(home() / "lake"))).resolve()


def budget_path() -> Path:
    """The SQLite file that holds the rate budget every local process shares."""
    return Path(os.environ.get("REDOX_BUDGET_PATH", str(home() / "budget.sqlite"))).resolve()
