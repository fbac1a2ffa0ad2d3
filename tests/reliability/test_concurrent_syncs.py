"""Several `redox-etl sync` commands at once, as users and schedules start them.

Each sync is the real command in its own process (``redox-etl sync`` on the venv), against a tiny
sandbox on loopback, on one REDOX_ETL_HOME (so one Dagster instance, one lake, one rate budget):

- two syncs started together on a fresh home both succeed: the instance's SQLite storages are
  created once, under a lock (they used to race: ``UNIQUE constraint failed``), and both runs are
  in the instance ``make ui`` serves (``python -m pipelines.instance``);
- two syncs whose windows overlap, started together 20 times while the sandbox keeps changing
  records (so ``redox_changes`` queues days both could re-pull), all succeed, and the lake equals
  the sandbox's truth on the window after each round (real commands: each round pays two start-ups);
- a claimed pending day is not handed to a second process until the first is gone.
"""

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster._core.storage.dagster_run import DagsterRunStatus
from polars.testing import assert_frame_equal

from pipelines import instance as project_instance
from pipelines import runner
from resources.warehouse import Warehouse
from sandbox.server import Running, serve_in_thread
from tests.pipeline.truth import COMPARED, KEY, expected, lake_rows
from tests.reliability.sync_harness import window

pytestmark = [pytest.mark.slow, pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("redox-etl"))
ROUNDS = int(os.environ.get("REDOX_ETL_TEST_OVERLAP_ROUNDS", "20"))
# One command's whole budget, start-up included; a hang fails the test rather than the suite.
TIMEOUT_S = 600


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Running, dict[str, str]]]:
    """A tiny sandbox over three days, and the environment a user's shell would have for it."""
    first, last = window(3)
    home = tmp_path / "home"
    with serve_in_thread(
        state_dir=tmp_path / "sandbox", patients=30, seed=13, start=first, end=last, rate_limit=None
    ) as running:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDOX_", "DAGSTER_"))}
        env |= {
            "REDOX_ETL_HOME": str(home),
            "REDOX_SANDBOX_CREDENTIALS": str(running.credentials_path),
            "NO_COLOR": "1",
        }
        # This process (the instance and lake checks) sees what the commands see.
        for name in [n for n in os.environ if n.startswith(("REDOX_", "DAGSTER_"))]:
            monkeypatch.delenv(name)
        for name in [n for n in env if n.startswith("REDOX_")]:
            monkeypatch.setenv(name, env[name])
        yield running, env


def _start(env: dict[str, str], first: dt.date, last: dt.date) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [CLI, "sync", "--start", first.isoformat(), "--end", last.isoformat()],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _all_succeed(procs: list[subprocess.Popen[str]]) -> None:
    outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"a sync failed (exit {proc.returncode}):\n{output[-4000:]}"


def test_two_syncs_started_at_once_on_a_fresh_home_both_succeed(
    sandbox: tuple[Running, dict[str, str]],
) -> None:
    _, env = sandbox
    first, last = window(3)
    assert not Path(env["REDOX_ETL_HOME"]).exists()
    _all_succeed([_start(env, first, last), _start(env, last, last)])

    # The instance `make ui` serves is the one both commands wrote their runs to.
    with project_instance.get() as inst:
        assert Path(inst.root_directory) == Path(env["REDOX_ETL_HOME"]).resolve() / "dagster"
        runs = inst.get_runs()
    assert len(runs) >= 2 and all(r.status == DagsterRunStatus.SUCCESS for r in runs)


# Twenty rounds of two real sync commands: longer than the suite's 600 s per-test default.
@pytest.mark.timeout(3000)
def test_overlapping_syncs_repeated_all_succeed_and_equal_truth(
    sandbox: tuple[Running, dict[str, str]],
) -> None:
    running, env = sandbox
    first, last = window(3)
    middle = first + dt.timedelta(days=1)
    _all_succeed([_start(env, first, last)])  # the first look sets the changes watermark
    for _ in range(ROUNDS):
        # Reschedules, corrections and moves on the window's days: redox_changes queues them.
        # A tiny population can go hours without a change: move on until something changed.
        assert any(sum(running.world.advance(dt.timedelta(hours=3)).values()) for _ in range(16))
        _all_succeed([_start(env, first, last), _start(env, middle, last)])
        _assert_window_equals_truth(running, first, last)


def test_a_claimed_pending_day_is_left_to_its_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path))
    monkeypatch.delenv("REDOX_ETL_LAKE", raising=False)
    day = dt.date(2026, 3, 4)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import datetime, sys; from pipelines import runner;"
            f"assert runner.claim(datetime.date({day.year}, {day.month}, {day.day}));"
            "print('held', flush=True); sys.stdin.read()",
        ],
        cwd=REPO,
        env={**os.environ, "REDOX_ETL_HOME": str(tmp_path)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not runner.claim(day)
        assert runner.claim(day + dt.timedelta(days=1))
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: the day can be claimed again.
    assert runner.claim(day)
    runner.release_claims()


def _assert_window_equals_truth(running: Running, first: dt.date, last: dt.date) -> None:
    want = expected(running.world.truth(), first, last)
    warehouse = Warehouse()
    for table, columns in COMPARED.items():
        got = lake_rows(warehouse, table, first, last)
        if table == "patients":
            # Days re-pulled outside the window may bring more patients; the window's must be right.
            got = got.join(want[table].select(KEY), on=KEY, how="semi")
        assert got.height == got.select(KEY).unique().height, f"{table}: duplicate keys"
        assert_frame_equal(
            got.sort(KEY),
            want[table].select(KEY + columns).sort(KEY),
            check_dtypes=False,
            check_exact=False,
        )
