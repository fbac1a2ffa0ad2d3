"""A backfill killed mid-way and resumed ends equal to truth, loading no partition twice.

The real command (`redox-etl backfill`, which runs a Dagster backfill under its own dagster-daemon)
is started in its own process group against a sandbox on loopback, then the whole group (command,
daemon, run workers) is SIGKILLed, as a crashed machine would be: once while the first days are
being fetched and once while days are being loaded. Rerunning the same command must finish the job.
"""

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines import runner
from resources.warehouse import Warehouse
from sandbox.server import serve_in_thread
from tests.pipeline.truth import assert_equal as _assert_equal
from tests.pipeline.truth import expected as _expected

# Three command starts, each with its own daemon and run processes: minutes on a busy 2-core box.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]
ROOT = Path(__file__).resolve().parents[2]


def _start(first: dt.date, last: dt.date, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "backfill", "--start", str(first), "--end", str(last)],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kill_when(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, timeout: float = 240
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the backfill ended (code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _manifests(lake: Path) -> dict[str, str]:
    return {
        str(path.parent.relative_to(lake)): json.loads(path.read_text())["written_at"]
        for path in (lake / "raw").rglob("manifest.json")
    }


def _loads(warehouse: Warehouse) -> int:
    try:
        return int(warehouse.query("SELECT count(*) AS n FROM partition_loads")["n"][0])
    except Exception:  # the lake or its tables do not exist yet
        return 0


def test_killed_backfill_resumes_to_truth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("REDOX_ETL_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("REDOX_BUDGET_PATH", str(tmp_path / "budget.sqlite"))
    today = dt.datetime.now(dt.UTC).date()
    # Two weeks: two backfill runs of seven days each (the backfill policy), so a kill can fall
    # between partitions of one run or between runs.
    first, last = today - dt.timedelta(days=20), today - dt.timedelta(days=7)
    log = tmp_path / "backfill.log"
    with serve_in_thread(
        state_dir=tmp_path / "sandbox", patients=80, seed=5, start=first, end=last, rate_limit=None
    ) as running:
        monkeypatch.setenv("REDOX_SANDBOX_CREDENTIALS", str(running.credentials_path))
        lake = home / "lake"
        warehouse = Warehouse()

        # 1. During fetch: some days landed, nothing loaded yet.
        proc = _start(first, last, log)
        _kill_when(proc, lambda: len(_manifests(lake)) >= 3, "landed pages")
        landed_before = _manifests(lake)

        # 2. During load: the lake holds some loads but not all of them.
        proc = _start(first, last, log)
        _kill_when(proc, lambda: _loads(warehouse) > 0, "committed load")
        assert _loads(warehouse) < 4 * 2 * 14, "the load had already finished: the kill came too late"

        # 3. Resume to the end.
        proc = _start(first, last, log)
        assert proc.wait(timeout=1200) == 0, log.read_text()[-3000:]

        _assert_equal(_expected(running.world.truth(), first, last), first, last)
        twice = warehouse.query(
            "SELECT table_name, source_surface, partition_day, count(*) AS n FROM partition_loads"
            " GROUP BY ALL HAVING count(*) > 1"
        )
        assert twice.is_empty(), f"{twice.height} partition(s) loaded more than once"
        loads = warehouse.query("SELECT count(*) AS n FROM partition_loads")["n"][0]
        assert loads == 4 * 2 * 14  # every (table, surface, day) exactly once
        # Nothing the killed commands left behind is still waiting or holding the warehouse slot.
        inst = runner.instance()
        unfinished = [r.status.value for r in inst.get_runs() if not r.is_finished]
        assert not unfinished, f"runs left unfinished: {unfinished}"
        assert not inst.event_log_storage.get_concurrency_run_ids(), "a pool slot is still held"
        # Only what was in flight is fetched again: pages landed before the first kill are kept.
        after = _manifests(lake)
        rewritten = [key for key, written in landed_before.items() if after.get(key) != written]
        assert not rewritten, f"{len(rewritten)} landed partition(s) fetched again"
